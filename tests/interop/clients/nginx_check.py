"""sluice behind nginx (Debian's nginx-light) with an ordinary reverse-proxy
config, without `proxy_buffering off` (nginx.conf beside this file).

    python nginx_check.py --direct A --nginx N --hb-direct B --hb-nginx M \
        --control K [--h2 HOST:PORT]

--direct: sluice `--sim-itl-ms 100 --sim-tokens 500`, --nginx: nginx in front
of it; --hb-direct: sluice `--heartbeat-ms 100 --sim-ttft-ms 600`,
--hb-nginx: nginx in front of it; --bp-direct: sluice `--sim-itl-ms 0
--sim-ttft-ms 0 --sim-tokens 200000 --max-tokens-limit 200000
--write-timeout-ms 1000`, --bp-nginx: nginx in front of it, --bp-control: the
same told to ignore X-Accel-Buffering; --h2: nginx-recommended.conf (TLS,
HTTP/2) in front of a sluice with --sim-itl-ms 50.
"""

import argparse
import json
import socket
import subprocess
import time

from common import Checks, median, metric, metrics, native_text, sse, wait_metric

ap = argparse.ArgumentParser()
ap.add_argument("--direct", required=True)
ap.add_argument("--nginx", required=True)
ap.add_argument("--hb-direct", required=True)
ap.add_argument("--hb-nginx", required=True)
ap.add_argument("--bp-direct", required=True)
ap.add_argument("--bp-nginx", required=True)
ap.add_argument("--bp-control", required=True)
ap.add_argument("--h2")
args = ap.parse_args()

c = Checks("nginx")
ITL_MS = 100
SLOW_TOKENS = 200000


def tokens(events):
    return [e for e in events if e.event == "token"]


def fmt(ts):
    return "[" + ", ".join(f"{1000 * t:.0f}" for t in ts) + "] ms"


def spread(label, addr, n=10):
    status, hdrs, events, reads = sse(addr, "POST", "/v1/chat/stream", {"prompt": "spread check", "max_tokens": n})
    ts = [e.t for e in tokens(events)]
    gaps = [b - a for a, b in zip(ts, ts[1:])]
    return status, hdrs, events, ts, gaps


def accel_header():
    _, h1, _, _ = sse(args.direct, "POST", "/v1/chat/stream", {"prompt": "x", "max_tokens": 1})
    _, h2, _, _ = sse(args.direct, "POST", "/v1/chat/completions",
                      {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "stream": True})
    c.check("sluice sends X-Accel-Buffering: no on both streaming endpoints",
            h1.get("X-Accel-Buffering") == "no" and h2.get("X-Accel-Buffering") == "no",
            f"native {h1.get('X-Accel-Buffering')!r}, chat completions {h2.get('X-Accel-Buffering')!r}")


def token_spread():
    want, _, _ = native_text(args.direct, {"prompt": "spread check", "max_tokens": 10})
    status, hdrs, events, ts, gaps = spread("nginx", args.nginx)
    text = "".join(json.loads(e.data)["t"] for e in tokens(events))
    c.check("through nginx: 200 text/event-stream, same text, ends with done",
            status == 200 and hdrs.get("Content-Type", "").startswith("text/event-stream")
            and text == want and events[-1].event == "done",
            f"X-Accel-Buffering seen by the client: {hdrs.get('X-Accel-Buffering')}")
    c.check(
        "through nginx: tokens arrive one by one (spread over time, ~ITL apart)",
        len(ts) == 10 and min(gaps) >= 0.5 * ITL_MS / 1000 and ts[-1] - ts[0] >= 0.8 * 9 * ITL_MS / 1000,
        f"arrivals {fmt(ts)}, min gap {1000 * min(gaps):.0f} ms",
    )


def slow_client(nginx, sluice, timeout=5.0):
    """A client that sends a request through nginx and then reads nothing.

    Returns how the stream ended in sluice ('slow_consumer', 'done',
    'disconnected' or None) and the seconds it took.
    """
    keys = {
        "slow_consumer": 'sluice_streams_errored_total{code="slow_consumer"}',
        "done": "sluice_streams_completed_total",
        "disconnected": "sluice_streams_disconnected_total",
    }
    before = metrics(sluice)
    body = json.dumps({"prompt": "slow reader", "max_tokens": SLOW_TOKENS}).encode()
    host, port = nginx.rsplit(":", 1)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    t0 = time.monotonic()
    try:
        s.sendall(b"POST /v1/chat/stream HTTP/1.1\r\nHost: sluice\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        head = s.recv(64)
        assert head.startswith(b"HTTP/1.1 200"), head
        while time.monotonic() - t0 < timeout:
            now = metrics(sluice)
            for outcome, key in keys.items():
                if now.get(key, 0) > before.get(key, 0):
                    return outcome, time.monotonic() - t0, now.get("sluice_bytes_sent_total", 0) - before.get("sluice_bytes_sent_total", 0)
            time.sleep(0.05)
        return None, time.monotonic() - t0, 0
    finally:
        s.close()


def backpressure():
    # sluice --sim-itl-ms 0 --sim-tokens 200000 --write-timeout-ms 1000: a
    # fast ~7 MB answer. With X-Accel-Buffering honoured nginx reads from
    # sluice only as fast as its client, so sluice sees the slow client.
    outcome, secs, sent = slow_client(args.bp_nginx, args.bp_direct)
    c.check("slow client behind nginx: backpressure reaches sluice (stream ends slow_consumer)",
            outcome == "slow_consumer", f"{outcome} after {secs:.2f} s, {sent / 1e6:.1f} MB sent by sluice")
    # Control: the same config with `proxy_ignore_headers X-Accel-Buffering`
    # buffers the whole answer in nginx: sluice believes it was delivered.
    outcome, secs, sent = slow_client(args.bp_control, args.bp_direct)
    c.check("control (proxy_ignore_headers X-Accel-Buffering): nginx swallows the whole answer, sluice sees done",
            outcome == "done", f"{outcome} after {secs:.2f} s, {sent / 1e6:.1f} MB sent by sluice")


def ttft(addr):
    _, _, events, _ = sse(addr, "POST", "/v1/chat/stream", {"prompt": "ttft check", "max_tokens": 1})
    toks = tokens(events)
    assert toks and events[-1].event == "done", events
    return toks[0].t


def ttft_compare(runs=7):
    ttft(args.direct)  # warm both paths (nginx opens its keep-alive connection)
    ttft(args.nginx)
    d, n = [], []
    for _ in range(runs):
        d.append(ttft(args.direct))
        n.append(ttft(args.nginx))
    md, mn = median(d), median(n)
    print(f"TTFT direct  {fmt(d)}\nTTFT nginx   {fmt(n)}", flush=True)
    print(f"TTFT median: direct {1000 * md:.2f} ms, nginx {1000 * mn:.2f} ms, difference {1000 * (mn - md):+.2f} ms", flush=True)
    c.check("TTFT through nginx within 20 ms of direct (medians of 7)", abs(mn - md) < 0.020,
            f"direct {1000 * md:.2f} ms, nginx {1000 * mn:.2f} ms, diff {1000 * (mn - md):+.2f} ms")


def heartbeats():
    for label, addr in (("direct", args.hb_direct), ("nginx", args.hb_nginx)):
        _, _, events, _ = sse(addr, "POST", "/v1/chat/stream", {"prompt": "heartbeat check", "max_tokens": 3})
        toks = tokens(events)
        first = toks[0].t if toks else float("inf")
        hbs = [e.t for e in events if e.event == "heartbeat" and e.t < first]
        desc = f"{len(hbs)} heartbeats at {fmt(hbs)} before the first token at {1000 * first:.0f} ms"
        print(f"heartbeats {label}: {desc}", flush=True)
        if label == "nginx":
            c.check("heartbeats pass through nginx before the first token, as they are sent",
                    len(hbs) >= 3 and hbs[0] < 0.3 and first >= 0.55 and events[-1].event == "done", desc)


def client_leaves():
    addr = args.direct
    disc0 = metric(addr, "sluice_streams_disconnected_total")
    _, _, events, _ = sse(args.nginx, "POST", "/v1/chat/stream", {"prompt": "leave check", "max_tokens": 500},
                          stop=lambda evs: len(tokens(evs)) >= 3)
    t0 = time.monotonic()
    ok, disc1, _ = wait_metric(addr, "sluice_streams_disconnected_total", lambda v: v >= disc0 + 1, 2.0)
    c.check("client leaving nginx mid-stream: sluice_streams_disconnected_total +1 within 2 s",
            ok and disc1 == disc0 + 1 and len(tokens(events)) == 3,
            f"{disc0:.0f} -> {disc1:.0f} after {1000 * (time.monotonic() - t0):.0f} ms")
    ok2, open1, _ = wait_metric(addr, "sluice_streams_open", lambda v: v == 0, 2.0)
    c.check("client leaving nginx: sluice_streams_open back to 0", ok2, f"open={open1:.0f}")


def openai_through_nginx():
    status, _, events, _ = sse(args.nginx, "POST", "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "spread check"}], "max_tokens": 5, "stream": True})
    datas = [e for e in events if e.data is not None]
    content = [e.t for e in datas if e.data != "[DONE]" and (json.loads(e.data).get("choices") or [{}])[0].get("delta", {}).get("content")]
    gaps = [b - a for a, b in zip(content, content[1:])]
    c.check("chat completions stream through nginx: chunks one by one, then [DONE]",
            status == 200 and datas[-1].data == "[DONE]" and len(content) == 5 and min(gaps) >= 0.5 * ITL_MS / 1000,
            f"content chunks at {fmt(content)}")


def h2_curl():
    url = f"https://{args.h2}/v1/chat/stream?prompt=h2+check&max_tokens=10"
    want, _, _ = native_text(args.direct, {"prompt": "h2 check", "max_tokens": 10})
    t0 = time.perf_counter()
    proc = subprocess.Popen(["curl", "-sS", "-N", "-k", "--http2", "--max-time", "10", "-D", "-", url],
                            stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append((time.perf_counter() - t0, line.rstrip("\r\n")))
    proc.wait()
    status = lines[0][1] if lines else ""
    toks = [(t, json.loads(l[6:])["t"]) for t, l in lines if l.startswith('data: {"t"')]
    ts = [t for t, _ in toks]
    gaps = [b - a for a, b in zip(ts, ts[1:])]
    # This sluice runs with --sim-itl-ms 50.
    c.check("curl --http2 through nginx-recommended.conf: HTTP/2 200, tokens one by one",
            status.startswith("HTTP/2 200") and "".join(t for _, t in toks) == want and len(ts) == 10
            and min(gaps) >= 0.025 and any(l == "event: done" for _, l in lines),
            f"{status!r}, arrivals {fmt(ts)}")


c.scenario("X-Accel-Buffering", accel_header)
c.scenario("token spread", token_spread)
c.scenario("TTFT", ttft_compare)
c.scenario("heartbeats", heartbeats)
c.scenario("client leaves", client_leaves)
c.scenario("backpressure", backpressure)
c.scenario("openai endpoint", openai_through_nginx)
if args.h2:
    c.scenario("http2", h2_curl)
c.finish()
