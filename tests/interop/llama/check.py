#!/usr/bin/env python3
"""Interop checks of sluice (--backend openai) against a real llama.cpp model server.

Stdlib only. Usage:
    check.py --sluice 127.0.0.1:PORT --llama 127.0.0.1:PORT [--model smollm2]

Both servers must already run; sluice must point at the model server
(--upstream-url http://LLAMA/v1 --upstream-model smollm2).

Every timing is taken with the same raw-socket client for both paths: the
connection is opened first, the clock starts just before the request is sent
and stops when the bytes holding the first text token have been received.
Prints one line per check and ends with `interop llama: N passed, M failed`.
"""

import argparse
import json
import socket
import statistics
import sys
import threading
import time
import traceback

MODEL = "smollm2"


def hostport(s):
    host, _, port = s.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------- HTTP + SSE


class Stream:
    """One HTTP/1.1 POST whose response body is read as SSE, event by event.

    connect() opens the socket; send() sends the request and starts the clock;
    events() yields (time_since_send_s, event_name, data_str) as each event's
    bytes arrive. Handles chunked, Content-Length and close-delimited bodies.
    """

    def __init__(self, addr, path, body, timeout=60.0):
        self.addr = addr
        self.path = path
        self.body = json.dumps(body).encode()
        self.timeout = timeout
        self.sock = None
        self.t0 = None
        self.status = None
        self.headers = {}

    def connect(self):
        self.sock = socket.create_connection(self.addr, timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    def send(self):
        host = "%s:%d" % self.addr
        head = (
            "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            "Accept: text/event-stream\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            % (self.path, host, len(self.body))
        ).encode()
        self.t0 = time.perf_counter()
        self.sock.sendall(head + self.body)
        return self

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    def _recv(self):
        data = self.sock.recv(65536)
        return data, time.perf_counter()

    def events(self):
        buf = b""
        now = None
        # --- head
        while b"\r\n\r\n" not in buf:
            data, now = self._recv()
            if not data:
                raise IOError("connection closed before the response head")
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        length = self.headers.get("content-length")
        length = int(length) if length is not None else None

        # --- body, de-chunked incrementally into `body`
        raw = rest
        body = b""
        received = 0
        finished = False
        sse = b""

        def dechunk():
            nonlocal raw, body, finished
            while True:
                nl = raw.find(b"\r\n")
                if nl < 0:
                    return
                size = int(raw[:nl].split(b";")[0], 16)
                if size == 0:
                    finished = True
                    return
                if len(raw) < nl + 2 + size + 2:
                    return
                body += raw[nl + 2 : nl + 2 + size]
                raw = raw[nl + 2 + size + 2 :]

        while True:
            if chunked:
                dechunk()
            else:
                body += raw
                received += len(raw)
                raw = b""
                if length is not None and received >= length:
                    finished = True
            sse += body
            body = b""
            sse = sse.replace(b"\r\n", b"\n")
            while b"\n\n" in sse:
                block, _, sse = sse.partition(b"\n\n")
                name, datas = "message", []
                for line in block.decode("utf-8").split("\n"):
                    if line.startswith(":"):
                        continue
                    k, _, v = line.partition(":")
                    if v.startswith(" "):
                        v = v[1:]
                    if k == "event":
                        name = v
                    elif k == "data":
                        datas.append(v)
                if datas or name != "message":
                    yield now - self.t0, name, "\n".join(datas)
            if finished:
                return
            data, now = self._recv()
            if not data:
                return
            raw += data


def http_get(addr, path, timeout=5.0):
    s = socket.create_connection(addr, timeout=timeout)
    try:
        s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path).encode())
        buf = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            buf += d
    finally:
        s.close()
    head, _, body = buf.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("utf-8", "replace")


# ------------------------------------------------------------- the two paths


def sluice_run(addr, messages, max_tokens, temperature=0, stop_after=None):
    """Stream through sluice. Returns dict(text, tokens, ttft, total, done, error, events)."""
    st = Stream(addr, "/v1/chat/stream",
                {"messages": messages, "max_tokens": max_tokens, "temperature": temperature})
    st.connect().send()
    out = {"text": "", "tokens": 0, "ttft": None, "total": None, "done": None,
           "error": None, "names": []}
    try:
        for t, name, data in st.events():
            out["names"].append(name)
            if name == "token":
                if out["ttft"] is None:
                    out["ttft"] = t
                out["text"] += json.loads(data)["t"]
                out["tokens"] += 1
                if stop_after is not None and out["tokens"] >= stop_after:
                    out["total"] = t
                    return out
            elif name == "done":
                out["done"] = json.loads(data)
                out["total"] = t
                break
            elif name == "error":
                out["error"] = json.loads(data)
                out["total"] = t
                break
        if st.status != 200:
            out["error"] = {"status": st.status}
        return out
    finally:
        st.close()


def direct_run(addr, messages, max_tokens, temperature=0):
    """Stream straight from the model server's /v1/chat/completions."""
    st = Stream(addr, "/v1/chat/completions",
                {"model": MODEL, "messages": messages, "max_tokens": max_tokens,
                 "temperature": temperature, "stream": True,
                 "stream_options": {"include_usage": True}})
    st.connect().send()
    out = {"text": "", "tokens": 0, "ttft": None, "total": None, "finish_reason": None,
           "usage": None, "done": False, "first_t": None, "last_t": None}
    try:
        for t, _name, data in st.events():
            if data == "[DONE]":
                out["done"] = True
                out["total"] = t
                break
            obj = json.loads(data)
            if obj.get("usage"):
                out["usage"] = obj["usage"]
            for ch in obj.get("choices") or []:
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    if out["ttft"] is None:
                        out["ttft"] = t
                    out["text"] += piece
                    out["tokens"] += 1
                    out["last_t"] = t
                if ch.get("finish_reason"):
                    out["finish_reason"] = ch["finish_reason"]
        if out["total"] is None:
            out["total"] = time.perf_counter() - st.t0
        if st.status != 200:
            raise AssertionError("model server answered %s" % st.status)
        return out
    finally:
        st.close()


def metric(addr, name):
    status, body = http_get(addr, "/metrics")
    assert status == 200, "GET /metrics -> %s" % status
    total = 0.0
    found = False
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


def user(text):
    return [{"role": "user", "content": text}]


# -------------------------------------------------------------------- checks


def check_same_text(a):
    msgs = user("Name three colors of the rainbow and say one sentence about each.")
    # llama.cpp reuses the KV cache of a matching prompt prefix; a cold prompt
    # evaluation can round differently from a warm one and change a
    # temperature-0 answer. One warm-up run puts both paths in the same state.
    direct_run(a.llama, msgs, 32)
    direct = direct_run(a.llama, msgs, 32)
    through = sluice_run(a.sluice, msgs, 32)
    assert through["error"] is None, "sluice stream failed: %r" % (through["error"],)
    assert direct["done"], "direct stream did not end with [DONE]"
    assert direct["text"], "the model answered no text"
    if through["text"] != direct["text"]:
        again = direct_run(a.llama, msgs, 32)
        raise AssertionError(
            "text differs:\n  direct: %r\n  sluice: %r\n  direct again: %r"
            % (direct["text"], through["text"], again["text"]))
    d = through["done"]
    assert d is not None, "no done event; events: %r" % through["names"][-5:]
    assert d.get("finish_reason") in ("length", "stop"), "finish_reason: %r" % d
    assert d["finish_reason"] == direct["finish_reason"], (
        "finish_reason sluice %r, direct %r" % (d["finish_reason"], direct["finish_reason"]))
    u = d.get("usage") or {}
    assert isinstance(u.get("completion_tokens"), int) and u["completion_tokens"] > 0, "usage: %r" % d
    if direct["usage"]:
        assert u["completion_tokens"] == direct["usage"]["completion_tokens"], (
            "completion_tokens sluice %r, direct %r" % (u, direct["usage"]))
        assert u.get("prompt_tokens") == direct["usage"]["prompt_tokens"], (
            "prompt_tokens sluice %r, direct %r" % (u, direct["usage"]))
    return ("identical %d chars in %d token events, finish_reason=%s, sluice usage=%s "
            "(model server's usage chunk: %s); text=%r"
            % (len(through["text"]), through["tokens"], d["finish_reason"],
               json.dumps(u, sort_keys=True), json.dumps(direct["usage"]), through["text"][:60]))


def check_ttft(a):
    msgs = user("Say hello.")
    n, max_tokens, bound_ms = a.ttft_runs, 8, a.ttft_bound_ms
    # warm both paths (model, prompt cache, sluice's upstream connection)
    for _ in range(2):
        direct_run(a.llama, msgs, max_tokens)
        sluice_run(a.sluice, msgs, max_tokens)
    d, s = [], []
    for i in range(n):
        runs = [("d", lambda: direct_run(a.llama, msgs, max_tokens)),
                ("s", lambda: sluice_run(a.sluice, msgs, max_tokens))]
        if i % 2:
            runs.reverse()
        for kind, fn in runs:
            r = fn()
            assert r["ttft"] is not None, "%s run produced no token" % kind
            if kind == "s":
                assert r["done"] is not None, "sluice run ended without done: %r" % r["error"]
            (d if kind == "d" else s).append(r["ttft"] * 1000)
    md, ms = statistics.median(d), statistics.median(s)
    diff = ms - md
    info = ("median TTFT direct %.2f ms, sluice %.2f ms, difference %+.2f ms (bound %d ms); "
            "direct %s; sluice %s" % (md, ms, diff, bound_ms,
                                      [round(x, 1) for x in d], [round(x, 1) for x in s]))
    assert diff < bound_ms, info
    return info


def check_cancel(a):
    msgs = user("Write a very long story about a dragon who learns to fly. "
                "Make it at least 2000 words long, with many chapters.")
    long_tokens, read_first = 400, 5
    # How long the whole answer takes when nobody leaves (also gives tokens/s).
    full = direct_run(a.llama, msgs, long_tokens)
    rate = (full["tokens"] - 1) / (full["last_t"] - full["ttft"]) if full["tokens"] > 1 else 0
    base_cancelled = metric(a.sluice, "sluice_generations_cancelled_total")
    base_disc = metric(a.sluice, "sluice_streams_disconnected_total")
    # Through sluice: read a few tokens, then leave.
    part = sluice_run(a.sluice, msgs, long_tokens, stop_after=read_first)
    assert part["error"] is None and part["tokens"] == read_first, "partial run: %r" % part
    t_left = part["total"]  # since the request was sent
    remaining = max(0.0, full["total"] - t_left)
    # At once, a short request straight to the model server.
    t = time.perf_counter()
    short = direct_run(a.llama, user("Say hi."), 8)
    short_s = time.perf_counter() - t
    assert short["done"], "short direct request did not complete"
    info = ("long answer: %d tokens in %.2f s (%.0f tokens/s, finish=%s); left after %d tokens at "
            "%.3f s, %.2f s of generation remained; short direct request (8 tokens) completed "
            "in %.3f s (bound: < %.3f s)"
            % (full["tokens"], full["total"], rate, full["finish_reason"], read_first, t_left,
               remaining, short_s, min(1.5, remaining / 3)))
    assert remaining > 1.5, "inconclusive: the abandoned answer would need only %.2f s; %s" % (
        remaining, info)
    assert short_s < min(1.5, remaining / 3), "the model kept generating? " + info
    # sluice counted it as a client that left and cancelled the generation
    deadline = time.time() + 2
    while True:
        disc = metric(a.sluice, "sluice_streams_disconnected_total")
        canc = metric(a.sluice, "sluice_generations_cancelled_total")
        ok = disc is not None and disc >= (base_disc or 0) + 1
        if ok or time.time() > deadline:
            break
        time.sleep(0.05)
    assert ok, "sluice_streams_disconnected_total %r -> %r" % (base_disc, disc)
    info += "; disconnected_total %s->%s, generations_cancelled_total %s->%s" % (
        base_disc, disc, base_cancelled, canc)
    return info


def check_concurrent(a):
    prompts = ["Tell me a joke.", "What is the capital of France?",
               "Describe the sea in one sentence.", "Give me a word that rhymes with cat."]
    results = [None] * len(prompts)

    def worker(i):
        try:
            results[i] = sluice_run(a.sluice, user(prompts[i]), 16)
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = {"exception": repr(e)}

    t = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    wall = time.perf_counter() - t
    bad = [(i, r) for i, r in enumerate(results)
           if r is None or "exception" in r or r.get("done") is None]
    assert not bad, "streams without done: %r" % bad
    return ("4 streams all ended with done in %.2f s wall; per stream (ttft s, total s, tokens): %s"
            % (wall, [(round(r["ttft"], 3), round(r["total"], 3), r["tokens"]) for r in results]))


def wait_ready(a, timeout=30):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            status, _ = http_get(a.sluice, "/readyz")
            if status == 200:
                return
            last = status
        except OSError as e:
            last = e
        time.sleep(0.2)
    raise AssertionError("sluice /readyz not 200 within %ds (last: %r)" % (timeout, last))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sluice", required=True, type=hostport)
    p.add_argument("--llama", required=True, type=hostport)
    p.add_argument("--ttft-runs", type=int, default=5)
    p.add_argument("--ttft-bound-ms", type=int, default=25)
    a = p.parse_args()

    wait_ready(a)
    checks = [("same text as the model server", check_same_text),
              ("TTFT through sluice vs direct", check_ttft),
              ("client leaving stops the model", check_cancel),
              ("4 concurrent streams complete", check_concurrent)]
    passed = failed = 0
    for name, fn in checks:
        t = time.perf_counter()
        try:
            info = fn(a)
            passed += 1
            print("PASS %s (%.2f s): %s" % (name, time.perf_counter() - t, info), flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported
            failed += 1
            print("FAIL %s (%.2f s): %s" % (name, time.perf_counter() - t, e), flush=True)
            if not isinstance(e, AssertionError):
                traceback.print_exc()
    print("interop llama: %d passed, %d failed" % (passed, failed), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
