#!/usr/bin/env python3
"""Holds N streams open against a sluice on loopback and reports the server's
memory per held stream (from /proc/PID/status), then closes them all.

A stopgap until `sluice-load` lands. Standard library only. Loopback only.

  python3 loadtest/scripts/hold.py --pid PID --port PORT --streams 10000

Start the server with a long --sim-ttft-ms so every stream stays open and
idle (waiting for its first token), e.g.
  target/release/sluice --listen 127.0.0.1:0 --sim-ttft-ms 600000
"""
import argparse
import asyncio
import resource
import sys
import time

BODY = b'{"prompt":"hold","max_tokens":1}'
REQ = (b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def open_stream(host, port, sem):
    async with sem:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        w.write(REQ)
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head[:80])
        return r, w


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--streams", type=int, default=10000)
    ap.add_argument("--hold-s", type=float, default=2.0)
    a = ap.parse_args()
    if not a.host.startswith("127.") and a.host != "::1":
        sys.exit("loopback only")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    before = rss_kib(a.pid)
    sem = asyncio.Semaphore(512)
    t0 = time.monotonic()
    conns = await asyncio.gather(*(open_stream(a.host, a.port, sem) for _ in range(a.streams)))
    t1 = time.monotonic()
    await asyncio.sleep(a.hold_s)
    held = rss_kib(a.pid)
    print(f"streams held: {len(conns)} (opened in {t1 - t0:.1f} s)")
    print(f"server RSS: {before} KiB before, {held} KiB while holding")
    print(f"per held stream: {(held - before) * 1024 / len(conns):.0f} bytes (user memory; kernel socket buffers not included)")
    for _, w in conns:
        w.close()
    await asyncio.sleep(1.0)


asyncio.run(main())
