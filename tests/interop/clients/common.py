"""Helpers shared by the client interop checks (stdlib only).

Each check script makes a `Checks`, records assertions with `check()` (or
runs a whole scenario with `scenario()`, where an exception is a failure),
and ends with `finish()`, which prints `RESULT <passed> <failed>` for run.sh.
"""

import http.client
import json
import re
import socket
import sys
import time
import traceback
import urllib.request


class Checks:
    def __init__(self, suite):
        self.suite = suite
        self.passed = 0
        self.failed = 0

    def check(self, name, ok, detail=""):
        tail = f" ({detail})" if detail else ""
        if ok:
            self.passed += 1
            print(f"PASS {self.suite}: {name}{tail}", flush=True)
        else:
            self.failed += 1
            print(f"FAIL {self.suite}: {name}{tail}", flush=True)
        return ok

    def scenario(self, name, fn):
        """Runs fn(); an exception counts as one failed check named `name`."""
        try:
            fn()
        except Exception:  # noqa: BLE001 - any failure is reported, not raised
            self.failed += 1
            print(f"FAIL {self.suite}: {name}: exception", flush=True)
            traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()

    def finish(self):
        print(f"RESULT {self.passed} {self.failed}", flush=True)
        sys.exit(0)


def split_hostport(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def http_get(addr, path, headers=None, timeout=5):
    req = urllib.request.Request(f"http://{addr}{path}", headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, dict(r.headers), r.read()


def http_post_json(addr, path, body, timeout=10):
    req = urllib.request.Request(
        f"http://{addr}{path}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, dict(r.headers), json.loads(r.read())


def metrics(addr):
    """`/metrics` as {"name" or "name{labels}": value}."""
    _, _, body = http_get(addr, "/metrics")
    out = {}
    for line in body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\S+?(?:\{[^}]*\})?)\s+(\S+)", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def metric(addr, name):
    return metrics(addr).get(name, 0.0)


def wait_metric(addr, name, pred, timeout):
    """Polls until pred(value) holds; returns (ok, value, seconds waited)."""
    t0 = time.monotonic()
    while True:
        v = metric(addr, name)
        if pred(v):
            return True, v, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return False, v, time.monotonic() - t0
        time.sleep(0.05)


class Event:
    __slots__ = ("t", "event", "data", "id", "comment")

    def __init__(self, t, event, data, id_, comment):
        self.t, self.event, self.data, self.id, self.comment = t, event, data, id_, comment

    def __repr__(self):
        return f"Event(t={self.t:.4f}, event={self.event!r}, data={self.data!r}, comment={self.comment!r})"


def _parse_block(block, t):
    event, data, id_, comment = None, [], None, None
    for line in block.split("\n"):
        if line.startswith(":"):
            comment = line[1:].strip()
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            v = line[5:]
            data.append(v[1:] if v.startswith(" ") else v)
        elif line.startswith("id:"):
            id_ = line[3:].strip()
    return Event(t, event, "\n".join(data) if data else None, id_, comment)


def sse(addr, method, path, body=None, headers=None, timeout=30, stop=None):
    """One request; returns (status, headers, [Event], reads).

    Each event carries `t`, the seconds from just before the request was sent
    to the read that completed it. `reads` is the list of (t, nbytes) of every
    socket read. `stop(events)` returning True closes the connection at once
    (a client leaving mid-stream).
    """
    host, port = split_hostport(addr)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    hdrs = {"Content-Type": "application/json"}
    hdrs.update(headers or {})
    payload = json.dumps(body).encode() if body is not None else None
    t0 = time.perf_counter()
    conn.request(method, path, body=payload, headers=hdrs)
    resp = conn.getresponse()
    events, reads, buf = [], [], ""
    try:
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                break
            t = time.perf_counter() - t0
            reads.append((t, len(chunk)))
            buf += chunk.decode()
            buf = buf.replace("\r\n", "\n")
            while "\n\n" in buf:
                block, buf = buf.split("\n\n", 1)
                if block.strip():
                    events.append(_parse_block(block, t))
            if stop is not None and stop(events):
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                break
    finally:
        resp.close()
        conn.close()
    return resp.status, dict(resp.getheaders()), events, reads


def native_text(addr, body):
    """The text the native endpoint streams for `body` (POST /v1/chat/stream)."""
    status, _, events, _ = sse(addr, "POST", "/v1/chat/stream", body)
    assert status == 200, f"native stream status {status}"
    toks = [json.loads(e.data)["t"] for e in events if e.event == "token"]
    ends = [e for e in events if e.event in ("done", "error")]
    assert ends and ends[-1].event == "done", f"native stream did not end with done: {ends}"
    return "".join(toks), json.loads(ends[-1].data), len(toks)


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
