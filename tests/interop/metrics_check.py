#!/usr/bin/env python3
"""Interop check of sluice's /metrics with real Prometheus parsers.

Run by tests/interop/run.sh against a running sluice started with

    --sim-ttft-ms 0 --sim-itl-ms 20 --sim-tokens 200 --max-stream-ms 1000

It scrapes /metrics, parses it with prometheus_client's text parser, checks
the contract's families and their types, then drives 3 completed streams,
2 streams whose client leaves after the first token and 1 stream that ends
with `deadline_exceeded`, scrapes again and checks the counters moved as
expected. It also asks for OpenMetrics with `Accept` and parses that with
prometheus_client's OpenMetrics parser, and, when --promtool is given, pipes
the 0.0.4 text into `promtool check metrics`.

Prints `interop metrics: N passed, M failed`; exits 1 when M > 0.
Needs only the standard library and prometheus_client.
"""

import argparse
import http.client
import json
import socket
import subprocess
import sys
import time
import urllib.parse

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as om_families,
)
from prometheus_client.parser import text_string_to_metric_families

TIMEOUT = 10.0

GAUGES = ["sluice_streams_open", "sluice_connections_open"]
# prometheus_client names a counter family without `_total`.
COUNTERS = [
    "sluice_streams_started",
    "sluice_streams_completed",
    "sluice_streams_errored",
    "sluice_streams_disconnected",
    "sluice_tokens_sent",
    "sluice_heartbeats_sent",
]
HISTOGRAMS = [
    "sluice_time_to_first_token_seconds",
    "sluice_inter_token_seconds",
    "sluice_stream_duration_seconds",
    "sluice_queue_wait_seconds",
]
OUTCOME_COUNTERS = [
    "sluice_streams_completed_total",
    "sluice_streams_disconnected_total",
]

passed = 0
failed = 0


def check(ok, what, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {what}")
    else:
        failed += 1
        print(f"FAIL {what}" + (f": {detail}" if detail else ""))
    return ok


# ------------------------------------------------------------------ HTTP


def get(host, port, path, headers=None):
    c = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.getheader("Content-Type", ""), r.read().decode()
    finally:
        c.close()


def sse_events(text):
    """Splits an SSE body into (event, data) pairs; comments are skipped."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        ev, datas, any_field = "message", [], False
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            any_field = True
            if field == "event":
                ev = value
            elif field == "data":
                datas.append(value)
        if any_field:
            out.append((ev, "\n".join(datas)))
    return out


def stream(host, port, max_tokens, prompt):
    """One whole stream on a fresh connection: (status, events)."""
    c = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        body = json.dumps({"prompt": prompt, "max_tokens": max_tokens})
        c.request(
            "POST",
            "/v1/chat/stream",
            body=body,
            headers={"Content-Type": "application/json"},
        )
        r = c.getresponse()
        # http.client de-chunks and raises IncompleteRead on a bad ending.
        return r.status, sse_events(r.read().decode())
    finally:
        c.close()


def stream_and_leave(host, port, max_tokens, prompt):
    """Starts a stream, reads up to its first token, then closes the socket.

    True when a token arrived before we left.
    """
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens}).encode()
    req = (
        b"POST /v1/chat/stream HTTP/1.1\r\nHost: t\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    s = socket.create_connection((host, port), timeout=TIMEOUT)
    try:
        s.sendall(req)
        buf = b""
        while b"event: token" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                return False
            buf += chunk
        return buf.startswith(b"HTTP/1.1 200")
    finally:
        s.close()


# ------------------------------------------------------------------ metrics


def scrape(host, port):
    status, ctype, text = get(host, port, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}: {text[:200]!r}")
    return ctype, text


def parse(text):
    """{family name: Metric}, and {(sample name, frozen labels): value}."""
    families = {}
    samples = {}
    for fam in text_string_to_metric_families(text):
        families[fam.name] = fam
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return families, samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def errored_by_code(samples):
    return {
        dict(labels)["code"]: v
        for (name, labels), v in samples.items()
        if name == "sluice_streams_errored_total" and "code" in dict(labels)
    }


def check_histogram(fam):
    """Buckets cumulative, +Inf bucket equals _count, sum non-negative."""
    buckets = []
    count = total = None
    for s in fam.samples:
        if s.name == fam.name + "_bucket":
            buckets.append((float(s.labels["le"]), s.value))
        elif s.name == fam.name + "_count":
            count = s.value
        elif s.name == fam.name + "_sum":
            total = s.value
    buckets.sort()
    cumulative = all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:]))
    inf = buckets[-1] if buckets else None
    ok = (
        len(buckets) >= 2
        and cumulative
        and inf is not None
        and inf[0] == float("inf")
        and count is not None
        and inf[1] == count
        and total is not None
        and total >= 0
    )
    return ok, f"buckets={buckets} count={count} sum={total}"


def wait_settled(host, port, want_started, deadline_s=5.0):
    """Polls until every started stream has ended; gives the last parse."""
    until = time.monotonic() + deadline_s
    while True:
        _, text = scrape(host, port)
        fams, samples = parse(text)
        started = value(samples, "sluice_streams_started_total") or 0
        ended = sum(value(samples, n) or 0 for n in OUTCOME_COUNTERS) + sum(
            errored_by_code(samples).values()
        )
        if (
            started >= want_started
            and started == ended
            and value(samples, "sluice_streams_open") == 0
        ):
            return text, fams, samples
        if time.monotonic() >= until:
            return text, fams, samples
        time.sleep(0.05)


# ------------------------------------------------------------------ main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True, help="http://127.0.0.1:PORT")
    ap.add_argument("--promtool", help="path to promtool (optional)")
    args = ap.parse_args()
    u = urllib.parse.urlsplit(args.url)
    host, port = u.hostname, u.port

    # 1. The first scrape: content type, families, types.
    ctype, text0 = scrape(host, port)
    check(
        ctype.startswith("text/plain") and "version=0.0.4" in ctype,
        "default content type is text/plain; version=0.0.4",
        ctype,
    )
    try:
        fams0, s0 = parse(text0)
        check(True, "prometheus_client text parser accepts the scrape")
    except Exception as e:  # noqa: BLE001 - report any parser error
        check(False, "prometheus_client text parser accepts the scrape", repr(e))
        return
    for name in GAUGES:
        f = fams0.get(name)
        check(
            f is not None and f.type == "gauge" and len(f.samples) == 1,
            f"{name} is a gauge with one sample",
            f and f"{f.type} {f.samples}",
        )
    for name in COUNTERS:
        f = fams0.get(name)
        check(
            f is not None
            and f.type == "counter"
            and len(f.samples) >= 1
            and all(s.name == name + "_total" for s in f.samples),
            f"{name}_total is a counter",
            f and f"{f.type} {f.samples}",
        )
    codes = errored_by_code(s0)
    check(
        "deadline_exceeded" in codes and "shutting_down" in codes,
        "sluice_streams_errored_total has a code label (one sample per code)",
        sorted(codes),
    )
    for name in HISTOGRAMS:
        f = fams0.get(name)
        if check(f is not None and f.type == "histogram", f"{name} is a histogram"):
            ok, detail = check_histogram(f)
            check(ok, f"{name} buckets are well-formed", detail)
    check(
        value(s0, "sluice_streams_open") == 0,
        "no stream open before the run",
        value(s0, "sluice_streams_open"),
    )

    # 2. Drive: 3 completed, 2 disconnected, 1 deadline_exceeded.
    for i in range(3):
        status, events = stream(host, port, 3, f"complete {i}")
        last = events[-1] if events else ("", "")
        tokens = [e for e in events if e[0] == "token"]
        check(
            status == 200 and last[0] == "done" and len(tokens) == 3,
            f"stream {i} completes with done after 3 tokens",
            f"{status} {events}",
        )
    for i in range(2):
        check(
            stream_and_leave(host, port, 200, f"leave {i}"),
            f"client {i} leaves after the first token",
        )
    status, events = stream(host, port, 200, "deadline")
    last = events[-1] if events else ("", "{}")
    code = json.loads(last[1]).get("code") if last[0] == "error" else None
    check(
        status == 200 and code == "deadline_exceeded",
        "a stream past --max-stream-ms ends with error deadline_exceeded",
        f"{status} {last}",
    )

    # 3. The second scrape: deltas.
    before = value(s0, "sluice_streams_started_total") or 0
    text1, fams1, s1 = wait_settled(host, port, before + 6)

    def delta(name, **labels):
        return (value(s1, name, **labels) or 0) - (value(s0, name, **labels) or 0)

    started_delta = delta("sluice_streams_started_total")
    check(started_delta == 6, "started +6", started_delta)
    check(
        delta("sluice_streams_completed_total") == 3,
        "completed +3",
        delta("sluice_streams_completed_total"),
    )
    check(
        delta("sluice_streams_disconnected_total") == 2,
        "disconnected +2",
        delta("sluice_streams_disconnected_total"),
    )
    check(
        delta("sluice_streams_errored_total", code="deadline_exceeded") == 1,
        'errored{code="deadline_exceeded"} +1',
        delta("sluice_streams_errored_total", code="deadline_exceeded"),
    )
    codes1 = errored_by_code(s1)
    other = {c: v - codes.get(c, 0) for c, v in codes1.items() if c != "deadline_exceeded"}
    check(all(v == 0 for v in other.values()), "no other error code moved", other)
    started = value(s1, "sluice_streams_started_total")
    outcomes = (
        value(s1, "sluice_streams_completed_total")
        + value(s1, "sluice_streams_disconnected_total")
        + sum(codes1.values())
    )
    check(
        started == outcomes,
        "started == completed + sum(errored) + disconnected",
        f"{started} != {outcomes}",
    )
    still_open = value(s1, "sluice_streams_open")
    check(still_open == 0, "sluice_streams_open back to 0", still_open)
    ttft = delta("sluice_time_to_first_token_seconds_count")
    check(ttft >= 3, "TTFT histogram count grew by at least 3", ttft)
    dur = delta("sluice_stream_duration_seconds_count")
    check(dur == 6, "stream duration histogram count grew by 6", dur)
    itl = delta("sluice_inter_token_seconds_count")
    check(itl >= 6, "inter-token histogram count grew (3 streams x 2 gaps at least)", itl)
    tokens = delta("sluice_tokens_sent_total")
    check(tokens >= 3 * 3 + 2 + 1, "tokens_sent grew by at least 12", tokens)
    for name in HISTOGRAMS:
        ok, detail = check_histogram(fams1[name])
        check(ok, f"{name} still well-formed after the run", detail)

    # 4. OpenMetrics when asked for.
    status, om_ctype, om_text = get(
        host,
        port,
        "/metrics",
        {"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    check(
        status == 200 and om_ctype.startswith("application/openmetrics-text"),
        "Accept: application/openmetrics-text gives OpenMetrics",
        f"{status} {om_ctype}",
    )
    check(om_text.endswith("# EOF\n"), "the OpenMetrics text ends with # EOF", repr(om_text[-40:]))
    try:
        om = {f.name: f for f in om_families(om_text)}
        check(True, "prometheus_client OpenMetrics parser accepts it")
        check(
            all(n in om and om[n].type == "counter" for n in COUNTERS)
            and all(n in om and om[n].type == "gauge" for n in GAUGES)
            and all(n in om and om[n].type == "histogram" for n in HISTOGRAMS),
            "OpenMetrics families have the same types",
            {n: om[n].type if n in om else None for n in GAUGES + COUNTERS + HISTOGRAMS},
        )
    except Exception as e:  # noqa: BLE001 - report any parser error
        check(False, "prometheus_client OpenMetrics parser accepts it", repr(e))

    # 5. promtool, when there is one.
    if args.promtool:
        p = subprocess.run(
            [args.promtool, "check", "metrics"],
            input=text1,
            capture_output=True,
            text=True,
            timeout=60,
        )
        out = (p.stdout + p.stderr).strip()
        if out:
            print(f"promtool says: {out}")
        check(p.returncode == 0, "promtool check metrics exits 0", f"exit {p.returncode}")
    else:
        print("skip promtool check metrics (no promtool)")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - any crash is a failed check
        check(False, "the check ran to the end", repr(e))
    print(f"interop metrics: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
