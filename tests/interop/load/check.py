"""Checks sluice-load's JSON from tests/interop/load/run.sh. Standard library only.

  python3 check.py llama.json sluice.json sluice-open.json llama.html
"""
import json
import sys

passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name}: {detail}")


def outcomes_add_up(j):
    s = j["streams"]
    parts = s["done"] + s["errored"] + s["reset"] + s["timeout"] + s["disconnected"] + s["connect_error"]
    return parts == s["started"], f"{s}"


llama, sl, op, html = (sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4])
llama, sl, op = (json.load(open(p)) for p in (llama, sl, op))

# -- llama.cpp (OpenAI chunks)
s = llama["streams"]
check("llama: 16 streams counted (warm-up excluded)", s["started"] == 16, s)
check("llama: outcomes add up", *outcomes_add_up(llama))
check("llama: every stream done", s["done"] == 16, s)
check("llama: HTTP 200 each time", s["http_status"].get("200") == 16, s["http_status"])
t = llama["ttft_ms"]
check("llama: TTFT present and ordered", t and 0 < t["p50"] <= t["p99"] <= t["max"], t)
fb, fe = llama["ttft_first_byte_ms"], llama["ttft_first_event_ms"]
check("llama: first byte <= first event <= first token",
      fb["p50"] <= fe["p50"] + 0.01 and fe["p50"] <= t["p50"] + 0.01, (fb, fe, t))
check("llama: tokens and gaps counted", llama["tokens"] > 16 and llama["itl_ms"]["count"] > 0, llama["tokens"])
h = llama["held"]
check("llama: 50 idle connections held", h["target"] == 50 and h["open_at_start"] == 50, h)
page = open(html).read()
check("llama: HTML report is self-contained", "<svg" in page and "<script" not in page, len(page))

# -- sluice, closed loop with faults, against its own /metrics
s, v = sl["streams"], sl["server"]
check("sluice: 3000 streams", s["started"] == 3000, s)
check("sluice: outcomes add up", *outcomes_add_up(sl))
check("sluice: done == server streams_completed delta", s["done"] == v["streams_completed"], (s["done"], v))
check("sluice: started == server streams_started delta", s["started"] == v["streams_started"], (s["started"], v))
check("sluice: disconnect faults == server streams_disconnected delta",
      s["disconnected"] == v["streams_disconnected"] and s["disconnected"] > 0, (s["disconnected"], v))
check("sluice: no errors", s["errored"] == 0 and s["reset"] == 0 and s["timeout"] == 0, s)
check("sluice: every done stream joined by X-Request-Id",
      sl["server_join"]["joined"] == s["done"] and sl["server_join"]["request_id_echoed"] == s["started"],
      sl["server_join"])
check("sluice: streams_open back to its baseline", v["streams_open_settle_ms"] is not None, v)


def bucket_of(buckets, q):
    """(lower, upper) edges in ms of the bucket holding quantile q."""
    total = buckets[-1][1]
    lower = 0.0
    for le, c in buckets:
        le = float("inf") if le == "+Inf" else le
        if c >= q * total:
            return lower, le
        lower = le
    return lower, float("inf")


for name, j in (("closed", sl), ("open+held", op)):
    b = j["server"]["ttft_ms"]["buckets_ms"]
    lo, hi = bucket_of(b, 0.5)
    p50 = j["ttft_ms"]["p50"]
    # the client's TTFT is the server's plus loopback transport: at or
    # above the server's median bucket, and at most a few ms past it
    check(f"sluice {name}: client TTFT p50 {p50} ms within the server's p50 bucket ({lo}, {hi}] (+5 ms)",
          lo <= p50 <= hi + 5, b)
    sj = j["server_join"]
    check(f"sluice {name}: per-request join: server ttft <= client ttft",
          sj["server_above_client"] == 0 and sj["joined"] > 0, sj)

# -- open loop with 2000 held streams
s, v = op["streams"], op["server"]
check("sluice open: 1000 streams, all done", s["started"] == 1000 and s["done"] == 1000, s)
check("sluice open: done == server streams_completed delta (held streams stay open)",
      s["done"] == v["streams_completed"], (s, v))
check("sluice open: server streams_open before/after include the 2000 held",
      v["streams_open_before"] >= 2000 and v["streams_open_after"] >= 2000, v)
check("sluice open: intended-time TTFT reported", op["ttft_intended_ms"]["p50"] >= op["ttft_ms"]["p50"] - 0.01,
      (op["ttft_intended_ms"], op["ttft_ms"]))
h = op["held"]
check("sluice open: 2000 held streams open at start and end",
      h["open_at_start"] == 2000 and h["open_at_end"] == 2000, h)

print(f"interop load: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
