"""Several sluice instances sharing resume and stop through a real Redis.

    python3 redis_check.py SLUICE_BIN REDIS_SERVER_BIN NGINX_BIN WORKDIR

Starts Debian's redis-server (with a password) and sluice instances on
loopback ports picked at run time, and checks, over plain sockets:

- resume across instances at random cut points (seeded): every event once,
  in order, the same text as an uncut stream; by `?after=` and by
  `Last-Event-ID`, and back again to the owner;
- a client resuming on another instance supersedes the owner's client;
- stop by id across instances (200, its client gets `cancelled`; then 404;
  another principal gets 404);
- kill -9 of the owner: the client that resumed elsewhere gets what was
  stored, then `producer_lost`, within about 5 s;
- Redis stopped mid-run: streaming and in-process resume go on, a foreign
  id answers as unknown, /readyz is 200 and says degraded, the metrics say
  so; Redis back: cross-instance resume works again;
- behind nginx (round robin over two instances, nginx-two.conf): a client
  that reconnects with `Last-Event-ID` lands on the other instance and
  gets the rest of its stream;
- the Redis password never reaches a log.

Everything listens on 127.0.0.1; every process started here is stopped.
Prints one line per check and `interop redis: N passed, M failed`.
"""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

SLUICE, REDIS, NGINX, WORK = sys.argv[1:5]
HERE = os.path.dirname(os.path.abspath(__file__))
PASSWORD = "s3cret-redis-pw"
WINDOW_MS = 30000
procs = []
passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_redis(port):
    p = subprocess.Popen(
        [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--requirepass", PASSWORD],
        stdout=open(os.path.join(WORK, f"redis-{port}.log"), "ab"),
        stderr=subprocess.STDOUT,
    )
    procs.append(p)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return p
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def start_sluice(name, redis_port, *extra):
    log = open(os.path.join(WORK, f"{name}.log"), "wb")
    args = [
        SLUICE, "--listen", "127.0.0.1:0", "--log-level", "debug",
        "--resume-window-ms", str(WINDOW_MS),
        "--resume-store", f"redis://:{PASSWORD}@127.0.0.1:{redis_port}/0",
        "--api-key-file", os.path.join(WORK, "keys"),
        *extra,
    ]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, env={"PATH": os.environ.get("PATH", "")})
    procs.append(p)
    deadline = time.time() + 10
    m = None
    while m is None and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
        text = open(os.path.join(WORK, f"{name}.log"), errors="replace").read()
        m = re.search(r"listening on http://([\d.]+):(\d+)", text)
    if not m:
        raise RuntimeError(f"sluice {name} did not start: " + open(os.path.join(WORK, f"{name}.log")).read())
    return p, int(m.group(2))


def start_nginx(a, b):
    prefix = os.path.join(WORK, "nginx")
    os.makedirs(os.path.join(prefix, "tmp"), exist_ok=True)
    os.chmod(WORK, 0o755)
    os.chmod(prefix, 0o755)
    for _ in range(3):
        port = free_port()
        conf = open(os.path.join(HERE, "nginx-two.conf")).read()
        for k, v in {"__PREFIX__": prefix, "__LISTEN__": f"127.0.0.1:{port}",
                     "__A__": f"127.0.0.1:{a}", "__B__": f"127.0.0.1:{b}"}.items():
            conf = conf.replace(k, v)
        with open(os.path.join(prefix, "nginx.conf"), "w") as f:
            f.write(conf)
        p = subprocess.Popen([NGINX, "-p", prefix, "-e", os.path.join(prefix, "error.log"), "-c",
                              os.path.join(prefix, "nginx.conf")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        deadline = time.time() + 5
        while time.time() < deadline and p.poll() is None:
            try:
                if get(port, "/healthz")[0] == 200:
                    return port
            except OSError:
                pass
            time.sleep(0.05)
        p.kill()
    raise RuntimeError("nginx did not start: " + open(os.path.join(prefix, "error.log")).read())


# ---------------------------------------------------------------- HTTP/SSE

class Sse:
    """One streaming request over a raw socket, read event by event."""

    def __init__(self, port, method, path, body=None, headers=None, key="key-alice-1"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        h = {"Host": "127.0.0.1", "Authorization": f"Bearer {key}"}
        h.update(headers or {})
        data = json.dumps(body).encode() if body is not None else b""
        if body is not None:
            h["Content-Type"] = "application/json"
            h["Content-Length"] = str(len(data))
        req = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
        self.sock.sendall(req.encode() + data)
        self.buf = b""
        self.body = b""
        head = self._until(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
        self.chunked = self.headers.get("transfer-encoding") == "chunked"
        self.done = False

    def _fill(self):
        got = self.sock.recv(65536)
        if not got:
            raise EOFError
        self.buf += got

    def _until(self, sep):
        while sep not in self.buf:
            self._fill()
        i = self.buf.index(sep)
        out, self.buf = self.buf[:i], self.buf[i + len(sep):]
        return out

    def _more_body(self):
        if not self.chunked:
            n = int(self.headers.get("content-length", "0"))
            while len(self.buf) < n:
                self._fill()
            self.body += self.buf[:n]
            self.buf = self.buf[n:]
            self.done = True
            return
        size = int(self._until(b"\r\n"), 16)
        if size == 0:
            self._until(b"\r\n")
            self.done = True
            return
        while len(self.buf) < size + 2:
            self._fill()
        self.body += self.buf[:size]
        self.buf = self.buf[size + 2:]

    def event(self):
        """The next event as a dict (id, event, data, retry), or None at the end."""
        while b"\n\n" not in self.body:
            if self.done:
                return None
            self._more_body()
        raw, self.body = self.body.split(b"\n\n", 1)
        ev = {}
        for line in raw.decode().split("\n"):
            k, _, v = line.partition(": ")
            ev[k] = v
        if "retry" in ev and "event" not in ev:
            return self.event()
        return ev

    def whole(self):
        while not self.done:
            self._more_body()
        return self.body

    def close(self):
        self.sock.close()


def post_json(port, path, body=None, key="key-alice-1"):
    s = Sse(port, "POST", path, body if body is not None else {}, key=key)
    out = s.whole()
    s.close()
    return s.status, out


def get(port, path, key="key-alice-1"):
    s = Sse(port, "GET", path, key=key)
    out = s.whole()
    s.close()
    return s.status, out


def tokens_of(events):
    return [(int(e["id"].rsplit(":", 1)[1]), json.loads(e["data"])["t"]) for e in events if e.get("event") == "token"]


def metric(port, name):
    _, body = get(port, "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_for(what, cond, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    print(f"     (gave up waiting for {what})")
    return False


# --------------------------------------------------------------- scenarios

def main():
    rng = random.Random(20261129)
    with open(os.path.join(WORK, "keys"), "w") as f:
        f.write("alice:key-alice-1\nbob:key-bob-22\n")
    rport = free_port()
    redis = start_redis(rport)
    sim = ["--sim-tokens", "30", "--sim-itl-ms", "15", "--sim-ttft-ms", "5"]
    # a runs two event loops: ids of its streams name either loop.
    a, pa = start_sluice("a", rport, *sim, "--threads", "2")
    b, pb = start_sluice("b", rport, *sim)
    # c's streams are long: time to supersede, stop and kill them.
    c, pc = start_sluice("c", rport, "--sim-tokens", "200", "--sim-itl-ms", "20")
    wait_for("the store", lambda: all(metric(p, "sluice_resume_store_up") == 1 for p in (pa, pb, pc)))

    # The uncut answer, for comparison.
    ref = Sse(pa, "POST", "/v1/chat/stream", {"prompt": "the reference"})
    evs = []
    while (e := ref.event()) is not None:
        evs.append(e)
    ref.close()
    want = tokens_of(evs)
    check("an uncut stream has 30 tokens and ends with done", len(want) == 30 and evs[-1]["event"] == "done", evs[-1:])

    # 1. Resume across instances at random cut points.
    ok = 0
    trials = 24
    for i in range(trials):
        owner, other = (pa, pb) if i % 2 == 0 else (pb, pa)
        s = Sse(owner, "POST", "/v1/chat/stream", {"prompt": "the reference"})
        sid = s.headers["x-stream-id"]
        cut = rng.randint(0, 29)
        got = []
        while len(got) < cut:
            e = s.event()
            if e.get("event") == "token":
                got.append(e)
        s.close()
        # At once, most of the time: the owner stores an event a moment
        # after its client has it, and a resume elsewhere that is ahead of
        # the store waits for it (never a 404).
        if rng.random() < 0.3:
            time.sleep(rng.uniform(0, 0.5))  # sometimes after the end
        after = int(got[-1]["id"].rsplit(":", 1)[1]) if got else 0
        if i % 3 == 0:
            r = Sse(other, "GET", "/v1/chat/stream", headers={"Last-Event-ID": f"{sid}:{after}"})
        else:
            r = Sse(other, "GET", f"/v1/chat/stream/{sid}?after={after}")
        rest = []
        while (e := r.event()) is not None:
            rest.append(e)
        r.close()
        toks = tokens_of(got) + tokens_of(rest)
        terminal = [e for e in rest if e.get("event") in ("done", "error")]
        if r.status == 200 and toks == want and len(terminal) == 1 and terminal[0]["event"] == "done" \
                and terminal[0]["id"] == f"{sid}:31":
            ok += 1
        else:
            print(f"     trial {i}: cut {cut} status {r.status} tokens {len(toks)} terminal {terminal}")
    check(f"resume on the other instance at random cut points: {ok}/{trials} exactly once, in order", ok == trials)

    # 1b. After the end: an EventSource reconnecting with the terminal id
    # elsewhere gets an empty 200 that ends at once (never a hang).
    s = Sse(pa, "POST", "/v1/chat/stream", {"prompt": "the reference"})
    sid = s.headers["x-stream-id"]
    while (e := s.event()) is not None:
        end_id = e.get("id")
    s.close()
    t0 = time.time()
    r = Sse(pb, "GET", "/v1/chat/stream", headers={"Last-Event-ID": end_id})
    rest = []
    while (e := r.event()) is not None:
        rest.append(e)
    r.close()
    check("resuming after the terminal event elsewhere: 200, nothing more, at once",
          r.status == 200 and not rest and time.time() - t0 < 2, (r.status, rest))

    # 2. There and back: cut on the owner, resume elsewhere, cut, resume on the owner.
    s = Sse(pa, "POST", "/v1/chat/stream", {"prompt": "the reference"})
    sid = s.headers["x-stream-id"]
    first = [s.event() for _ in range(4)]
    s.close()
    r = Sse(pb, "GET", f"/v1/chat/stream/{sid}?after=4")
    second = [r.event() for _ in range(5)]
    r.close()
    back = Sse(pa, "GET", f"/v1/chat/stream/{sid}?after=9")
    third = []
    while (e := back.event()) is not None:
        third.append(e)
    back.close()
    toks = tokens_of(first + second + third)
    check("owner → other → owner: every event once, in order", toks == want and third[-1]["event"] == "done", len(toks))

    # 3. A client resuming elsewhere supersedes the owner's client.
    s = Sse(pc, "POST", "/v1/chat/stream", {"prompt": "supersede me", "max_tokens": 200})
    sid = s.headers["x-stream-id"]
    s.event()
    r = Sse(pb, "GET", f"/v1/chat/stream/{sid}?after=1")
    r.event()
    last = None
    while (e := s.event()) is not None:
        last = e
    r.close()
    check("a resume on another instance supersedes the owner's client",
          last is not None and last.get("event") == "error" and "superseded" in last.get("data", ""), last)
    s.close()
    # ... and the owner's own client resuming again supersedes the one elsewhere.
    r = Sse(pa, "GET", f"/v1/chat/stream/{sid}?after=1")
    r.event()
    s2 = Sse(pc, "GET", f"/v1/chat/stream/{sid}?after=1")
    s2.event()
    last = None
    while (e := r.event()) is not None:
        last = e
    check("a resume on the owner supersedes a client following from elsewhere",
          last is not None and last.get("event") == "error" and "superseded" in last.get("data", ""), last)
    r.close()
    s2.close()

    # 4. Stop by id across instances.
    s = Sse(pc, "POST", "/v1/chat/stream", {"prompt": "stop me", "max_tokens": 200})
    sid = s.headers["x-stream-id"]
    s.event()
    st, _ = post_json(pb, f"/v1/chat/stream/{sid}/cancel", key="key-bob-22")
    check("another principal cannot stop it from another instance (404)", st == 404, st)
    t0 = time.time()
    st, body = post_json(pb, f"/v1/chat/stream/{sid}/cancel")
    last = None
    while (e := s.event()) is not None:
        last = e
    took = time.time() - t0
    s.close()
    check(f"stop on another instance: 200 and the client gets cancelled ({took * 1000:.0f} ms)",
          st == 200 and last and last.get("event") == "error" and '"cancelled"' in last["data"], (st, body, last))
    st, _ = post_json(pb, f"/v1/chat/stream/{sid}/cancel")
    check("stopping it again: 404", st == 404, st)
    st, _ = post_json(pb, "/v1/chat/stream/nosuchstreamid000000000/cancel")
    check("stopping an unknown id: 404", st == 404, st)
    st, _ = get(pb, "/v1/chat/stream/nosuchstreamid000000000?after=0")
    check("resuming an unknown id: 404", st == 404, st)
    st = Sse(pb, "GET", "/v1/chat/stream", headers={"Last-Event-ID": "nosuchstreamid000000000:3"}).status
    check("resuming an unknown id with Last-Event-ID: 204", st == 204, st)

    # 5. Behind nginx: round robin sends the reconnect to the other instance.
    pn = start_nginx(pa, pb)
    before = sum(metric(p, "sluice_remote_resumes_total") or 0 for p in (pa, pb))
    ok = 0
    for i in range(6):
        s = Sse(pn, "POST", "/v1/chat/stream", {"prompt": "the reference"})
        sid = s.headers["x-stream-id"]
        got = []
        while len(got) < 5 + i:
            e = s.event()
            if e.get("event") == "token":
                got.append(e)
        s.close()
        r = Sse(pn, "GET", "/v1/chat/stream", headers={"Last-Event-ID": got[-1]["id"]})
        rest = []
        while (e := r.event()) is not None:
            rest.append(e)
        r.close()
        ok += r.status == 200 and tokens_of(got + rest) == want and rest[-1]["event"] == "done"
    remote = sum(metric(p, "sluice_remote_resumes_total") or 0 for p in (pa, pb)) - before
    check(f"behind nginx (round robin): {ok}/6 reconnects got the rest, {remote:.0f} of them from the other instance",
          ok == 6 and remote >= 3, (ok, remote))

    # 6. kill -9 of the owner.
    s = Sse(pc, "POST", "/v1/chat/stream", {"prompt": "the owner dies", "max_tokens": 200})
    sid = s.headers["x-stream-id"]
    for _ in range(3):
        s.event()
    s.close()
    r = Sse(pa, "GET", f"/v1/chat/stream/{sid}?after=3")
    got = [r.event() for _ in range(3)]
    c.send_signal(signal.SIGKILL)
    c.wait()
    t0 = time.time()
    rest = []
    while (e := r.event()) is not None:
        rest.append(e)
    took = time.time() - t0
    r.close()
    toks = [n for n, _ in tokens_of(got + rest)]
    last = rest[-1] if rest else None
    check(f"owner killed: stored events in order, then producer_lost after {took:.1f} s",
          last is not None and last.get("event") == "error" and '"producer_lost"' in last["data"]
          and '"retryable":true' in last["data"] and toks == list(range(4, 4 + len(toks))) and took < 8,
          (last, toks[:5], took))

    # 7. Redis stopped mid-run.
    s = Sse(pb, "POST", "/v1/chat/stream", {"prompt": "redis goes away", "max_tokens": 30})
    sid_b = s.headers["x-stream-id"]
    s.event()
    redis.terminate()
    redis.wait()
    wait_for("b to notice", lambda: metric(pb, "sluice_resume_store_up") == 0)
    evs = []
    while (e := s.event()) is not None:
        evs.append(e)
    s.close()
    check("Redis stopped: the running stream ends with done", evs and evs[-1]["event"] == "done", evs[-1:])
    st, body = get(pb, "/readyz")
    check("Redis stopped: /readyz is 200 and says degraded", st == 200 and b"degraded" in body, (st, body))
    n = Sse(pb, "POST", "/v1/chat/stream", {"prompt": "new while down", "max_tokens": 5})
    sid_n = n.headers["x-stream-id"]
    n.event()
    n.close()
    evs = []
    r = Sse(pb, "GET", f"/v1/chat/stream/{sid_n}?after=1")
    while (e := r.event()) is not None:
        evs.append(e)
    check("Redis stopped: a new stream resumes on its own instance", r.status == 200 and evs and evs[-1]["event"] == "done", r.status)
    st, _ = get(pa, f"/v1/chat/stream/{sid_b}?after=1")
    check("Redis stopped: resuming it on another instance answers 404", st == 404, st)
    st, _ = post_json(pa, f"/v1/chat/stream/{sid_n}/cancel")
    check("Redis stopped: stopping it from another instance answers 404", st == 404, st)
    errors = metric(pb, "sluice_resume_store_errors_total")
    check("Redis stopped: failures are counted", errors is not None and errors > 0, errors)

    redis = start_redis(rport)
    back_up = wait_for("the store back", lambda: metric(pa, "sluice_resume_store_up") == 1 and metric(pb, "sluice_resume_store_up") == 1, timeout=15)
    st, body = get(pb, "/readyz")
    check("Redis back: store up and /readyz plain ready", back_up and st == 200 and body == b"ready\n", body)
    s = Sse(pb, "POST", "/v1/chat/stream", {"prompt": "the reference"})
    sid = s.headers["x-stream-id"]
    got = [s.event() for _ in range(10)]
    s.close()
    r = Sse(pa, "GET", f"/v1/chat/stream/{sid}?after=10")
    rest = []
    while (e := r.event()) is not None:
        rest.append(e)
    check("Redis back: resume across instances works again", tokens_of(got + rest) == want, len(tokens_of(got + rest)))

    # 8. The password never reaches a log.
    leaked = [n for n in ("a", "b", "c") if PASSWORD in open(os.path.join(WORK, f"{n}.log"), errors="replace").read()]
    check("the Redis password is in no log", not leaked, leaked)
    shown = "***" in open(os.path.join(WORK, "a.log")).read()
    check("the store URL is logged with the password masked", shown)


try:
    main()
except Exception as e:  # a crash is a failure, never a skip
    import traceback
    traceback.print_exc()
    failed += 1
finally:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
print(f"interop redis: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
