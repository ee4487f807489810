#!/usr/bin/env python3
"""Runs N streams (C at a time) against a sluice on loopback, optionally
while H other streams are held open, and reports time to first token: the
client's own (connect + request -> first `event: token` bytes) and the
server's (from the sluice_time_to_first_token_seconds histogram, as bucket
upper bounds). A stopgap until `sluice-load` lands. Standard library only.

  python3 loadtest/scripts/ttft.py --port PORT --streams 2000 --concurrency 50
"""
import argparse
import asyncio
import resource
import sys
import time
import urllib.request

BODY = b'{"prompt":"ttft","max_tokens":4}'
REQ = (b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY
HOLD_BODY = b'{"prompt":"hold","max_tokens":4096}'
HOLD = (b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(HOLD_BODY)) + HOLD_BODY


def histogram(port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    buckets = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), int(line.split()[-1])))
    return buckets


def quantile(buckets, before, q):
    total = buckets[-1][1] - before[-1][1]
    want = q * total
    for (le, c), (_, c0) in zip(buckets, before):
        if c - c0 >= want:
            return le
    return float("inf")


async def one(port, out):
    t0 = time.perf_counter()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(REQ)
    buf = b""
    while b"event: token" not in buf:
        chunk = await r.read(65536)
        if not chunk:
            raise RuntimeError("closed early")
        buf += chunk
    out.append(time.perf_counter() - t0)
    while b"event: done" not in buf and b"event: error" not in buf:
        chunk = await r.read(65536)
        if not chunk:
            break
        buf += chunk
    w.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--hold", type=int, default=0, help="streams held open meanwhile")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    held = []
    for i in range(a.hold):
        r, w = await asyncio.open_connection("127.0.0.1", a.port)
        w.write(HOLD)
        held.append((r, w))
    if held:
        await asyncio.sleep(1.0)
    before = histogram(a.port, "sluice_time_to_first_token_seconds")
    sem = asyncio.Semaphore(a.concurrency)
    client = []

    async def guarded():
        async with sem:
            await one(a.port, client)

    t0 = time.perf_counter()
    await asyncio.gather(*(guarded() for _ in range(a.streams)))
    dt = time.perf_counter() - t0
    after = histogram(a.port, "sluice_time_to_first_token_seconds")
    client.sort()
    pct = lambda q: client[min(len(client) - 1, int(q * len(client)))] * 1000
    print(f"{a.streams} streams, {a.concurrency} at a time, {a.hold} held open: {a.streams / dt:.0f} streams/s")
    print(f"client TTFT ms: p50 {pct(0.5):.3f} p90 {pct(0.9):.3f} p99 {pct(0.99):.3f}")
    print("server TTFT (histogram bucket bounds) ms: " + " ".join(
        f"p{int(q * 100)} <= {quantile(after, before, q) * 1000:g}" for q in (0.5, 0.9, 0.99)))
    for _, w in held:
        w.close()


asyncio.run(main())
