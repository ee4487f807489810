"""Headless Chromium (Debian's, driven by Playwright) on sluice's demo page.

    python browser_check.py --addr HOST:PORT --page-origin http://HOST:PORT \
        --nocors-addr HOST:PORT [--h2-url https://HOST:PORT/]

--addr: a sluice started with `--sim-itl-ms 50 --sim-tokens 500
--cors-origin <page origin>`; --page-origin: a plain web server serving a
copy of the demo page (another origin); --nocors-addr: a sluice without
--cors-origin; --h2-url: nginx with TLS + HTTP/2 in front of --addr.
"""

import argparse
import tempfile
import time

from playwright.sync_api import sync_playwright

from common import Checks, metric, native_text, wait_metric

ap = argparse.ArgumentParser()
ap.add_argument("--addr", required=True)
ap.add_argument("--page-origin", required=True)
ap.add_argument("--nocors-addr", required=True)
ap.add_argument("--h2-url")
ap.add_argument("--cut-addr", help="cut_proxy.py in front of --resume-addr")
ap.add_argument("--resume-addr", help="a sluice with --resume-window-ms")
args = ap.parse_args()

# ENV-NOTES' flags; Playwright adds --headless (headless=True) and the
# fresh --user-data-dir (launch_persistent_context).
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Records every change of #out: [ms since the click, text length].
RECORDER = """() => {
  const out = document.getElementById('out');
  window.__growth = [];
  window.__t0 = performance.now();
  new MutationObserver(() => window.__growth.push([performance.now() - window.__t0, out.textContent.length]))
    .observe(out, {childList: true, characterData: true, subtree: true});
}"""

c = Checks("browser")
addr = args.addr
base = f"http://{addr}"


def state(page):
    return page.evaluate("() => ({...window.sluice, out: document.getElementById('out').textContent,"
                         " status: document.getElementById('status').textContent,"
                         " ttft: document.getElementById('ttft').textContent,"
                         " rate: document.getElementById('rate').textContent})")


def start(page, url, prompt, max_tokens, server=""):
    page.goto(url)
    page.fill("#prompt", prompt)
    page.fill("#max", str(max_tokens))
    page.fill("#server", server)
    page.evaluate(RECORDER)
    page.click("#start")


def wait_end(page, timeout_ms=15000):
    page.wait_for_function("() => window.sluice.state !== 'streaming'", timeout=timeout_ms)
    return state(page)


def same_origin(page):
    prompt, n = "Tell me a story from the browser", 30
    want, _, _ = native_text(addr, {"prompt": prompt, "max_tokens": n})
    out = page.locator("#out")
    page.goto(base + "/")
    c.check("#out is the aria-live log region",
            out.get_attribute("role") == "log" and out.get_attribute("aria-live") == "polite")
    started0 = metric(addr, "sluice_streams_started_total")
    start(page, base + "/", prompt, n)
    s = wait_end(page)
    growth = [g for g in page.evaluate("() => window.__growth") if g[1] > 0]
    lengths = [g[1] for g in growth]
    span = (growth[-1][0] - growth[0][0]) if growth else 0
    c.check("same origin: state done", s["state"] == "done", f"state={s['state']}, status={s['status']!r}")
    c.check("same origin: #out text equals the native stream's text", s["out"] == want and s["tokens"] == n,
            f"{s['tokens']} tokens, {s['out']!r}")
    c.check(
        "same origin: #out grew token by token over time",
        len(growth) >= n - 2 and lengths == sorted(lengths) and span >= 0.8 * (n - 1) * 50,
        f"{len(growth)} updates over {span:.0f} ms (sim ITL 50 ms), {s['ttft']} {s['rate']}",
    )
    started1 = metric(addr, "sluice_streams_started_total")
    time.sleep(2.0)
    s2 = state(page)
    started2 = metric(addr, "sluice_streams_started_total")
    c.check(
        "same origin: no second run of the prompt after done (2 s later)",
        s2["streams"] == 1 and s2["state"] == "done" and started1 == started0 + 1 and started2 == started1,
        f"window.sluice.streams={s2['streams']}, sluice_streams_started_total {started0:.0f} -> {started1:.0f} -> {started2:.0f}",
    )


def bare_eventsource(page):
    """A plain EventSource that never closes: after `done` the browser
    reconnects with Last-Event-ID, sluice answers 204, the EventSource
    closes for good, and the prompt is not run a second time."""
    started0 = metric(addr, "sluice_streams_started_total")
    page.goto(base + "/")
    t0 = time.monotonic()
    page.evaluate("""(url) => {
      const log = window.__es = [];
      const t0 = performance.now();
      const es = window.__esobj = new EventSource(url);
      const note = (what) => log.push([Math.round(performance.now() - t0), what, es.readyState]);
      es.onopen = () => note('open');
      es.addEventListener('token', () => note('token'));
      es.addEventListener('done', () => note('done'));
      es.addEventListener('error', (e) => note(e.data ? 'server-error' : 'transport-error'));
    }""", "/v1/chat/stream?prompt=bare+EventSource&max_tokens=5")
    page.wait_for_function("() => window.__esobj.readyState === 2", timeout=10000)
    closed_after = time.monotonic() - t0
    log = page.evaluate("() => window.__es")
    time.sleep(0.5)
    started1 = metric(addr, "sluice_streams_started_total")
    kinds = [e[1] for e in log]
    c.check(
        "bare EventSource: after done the reconnect (Last-Event-ID) gets 204 and it closes; no second run",
        kinds.count("token") == 5 and kinds.count("done") == 1 and kinds.count("open") == 1
        and kinds[-1] == "transport-error" and started1 == started0 + 1,
        f"closed after {closed_after:.1f} s; streams started {started1 - started0:.0f}; events {log}",
    )


def stop(page):
    # The Stop button stops the stream by its id (POST …/cancel), then
    # drops the connection: the server counts it as cancelled.
    cancelled = 'sluice_streams_errored_total{code="cancelled"}'
    disc0 = metric(addr, cancelled)
    canc0 = metric(addr, "sluice_generations_cancelled_total")
    start(page, base + "/", "A long story to be stopped", 500)
    page.wait_for_function("() => window.sluice.tokens >= 5", timeout=10000)
    c.check("stop: a stream is open on the server", metric(addr, "sluice_streams_open") == 1)
    t_click = time.monotonic()
    page.click("#stop")
    ok, disc1, waited = wait_metric(addr, cancelled, lambda v: v >= disc0 + 1, 2.0)
    c.check("stop: the stream is cancelled by id on the server within 2 s", ok and disc1 == disc0 + 1,
            f"{disc0:.0f} -> {disc1:.0f} after {1000 * (time.monotonic() - t_click):.0f} ms")
    ok2, open1, _ = wait_metric(addr, "sluice_streams_open", lambda v: v == 0, 2.0)
    c.check("stop: sluice_streams_open back to 0", ok2, f"open={open1:.0f}")
    s1 = state(page)
    time.sleep(0.5)
    s2 = state(page)
    canc1 = metric(addr, "sluice_generations_cancelled_total")
    c.check("stop: page state stopped, no tokens after the click",
            s1["state"] == "stopped" and s2["tokens"] == s1["tokens"] and 5 <= s1["tokens"] < 500,
            f"state={s1['state']}, tokens={s1['tokens']}, generations cancelled {canc0:.0f} -> {canc1:.0f}")


def cross_origin_allowed(page):
    prompt, n = "Cross-origin story", 20
    want, _, _ = native_text(addr, {"prompt": prompt, "max_tokens": n})
    start(page, args.page_origin + "/", prompt, n, server=base)
    s = wait_end(page)
    c.check(f"cross-origin ({args.page_origin} -> {base}, --cors-origin set): stream done, same text",
            s["state"] == "done" and s["out"] == want and s["tokens"] == n,
            f"state={s['state']}, tokens={s['tokens']}, status={s['status']!r}")


def cross_origin_refused(page):
    nocors = args.nocors_addr
    started0 = metric(nocors, "sluice_streams_started_total")
    start(page, args.page_origin + "/", "Cross-origin story", 20, server=f"http://{nocors}")
    s = wait_end(page)
    c.check(
        f"cross-origin without --cors-origin: transport error, no tokens",
        s["state"] == "error" and "Connection error" in s["status"] and s["out"] == "" and s["tokens"] == 0,
        f"state={s['state']}, status={s['status']!r}, tokens={s['tokens']}",
    )
    time.sleep(0.5)
    s2 = state(page)
    ok, open1, _ = wait_metric(nocors, "sluice_streams_open", lambda v: v == 0, 2.0)
    started1 = metric(nocors, "sluice_streams_started_total")
    c.check("cross-origin refused: the page did not retry, the server holds no stream",
            s2["streams"] == 1 and ok and started1 - started0 <= 1,
            f"window.sluice.streams={s2['streams']}, streams started on the server {started1 - started0:.0f}, open={open1:.0f}")


def eventsource_resumes_through_a_cut(page):
    """A plain EventSource behind a link that resets the stream mid-answer:
    the browser reconnects by itself with Last-Event-ID, sluice replays
    what was lost, and the text ends complete, each token once."""
    cut = f"http://{args.cut_addr}"
    want, _, _ = native_text(args.resume_addr, {"prompt": "resume through a cut", "max_tokens": 80})
    resumed0 = metric(args.resume_addr, 'sluice_resumes_total{outcome="resumed"}')
    page.goto(cut + "/")
    page.evaluate("""(url) => {
      const s = window.__res = {text: '', opens: 0, tokens: 0, done: false, errors: 0};
      const es = new EventSource(url);
      es.onopen = () => { s.opens += 1; };
      es.addEventListener('token', (e) => { s.text += JSON.parse(e.data).t; s.tokens += 1; });
      es.addEventListener('done', () => { s.done = true; es.close(); });
      es.addEventListener('error', (e) => { s.errors += 1; if (e.data) es.close(); });
    }""", "/v1/chat/stream?prompt=resume+through+a+cut&max_tokens=80")
    page.wait_for_function("() => window.__res.done", timeout=20000)
    s = page.evaluate("() => window.__res")
    resumed1 = metric(args.resume_addr, 'sluice_resumes_total{outcome="resumed"}')
    c.check(
        "EventSource behind a cutting link: reconnects by itself and ends with the complete text, once",
        s["done"] and s["text"] == want and s["tokens"] == 80 and s["opens"] >= 2 and resumed1 >= resumed0 + 1,
        f"opens={s['opens']}, tokens={s['tokens']}, transport errors={s['errors']}, resumes {resumed0:.0f} -> {resumed1:.0f}",
    )


def demo_page_resumes_through_a_cut(page):
    """The demo page behind the same link: it asks for what came after the
    last event it saw and ends with the complete text."""
    cut = f"http://{args.cut_addr}"
    prompt = "the demo page resumes"
    want, _, _ = native_text(args.resume_addr, {"prompt": prompt, "max_tokens": 80})
    start(page, cut + "/", prompt, 80)
    s = wait_end(page, 20000)
    resumes = page.evaluate("() => window.sluice.resumes")
    c.check(
        "demo page behind a cutting link: resumes and ends done with the complete text",
        s["state"] == "done" and s["out"] == want and s["tokens"] == 80 and resumes >= 1,
        f"state={s['state']}, tokens={s['tokens']}, resumes={resumes}, status={s['status']!r}",
    )


def server_refusal(page):
    """A request the server refuses (max_tokens over --max-tokens-limit is a
    400): the page shows the server's own message, not a connection error."""
    start(page, base + "/", "A refused story", 5000)
    s = wait_end(page)
    c.check(
        "refusal: the page shows the server's own message",
        s["state"] == "error" and "Server error: bad_request" in s["status"] and "max_tokens" in s["status"]
        and s["tokens"] == 0,
        f"state={s['state']}, status={s['status']!r}",
    )


def final_figures(page):
    """The final status names which figures are the browser's and which the server's."""
    start(page, base + "/", "Figures", 5)
    s = wait_end(page)
    c.check(
        "done: the status region announces the final figures, labelled browser / server",
        s["state"] == "done" and "(browser)" in s["status"] and "(server)" in s["status"],
        f"status={s['status']!r}",
    )


def http2(page):
    prompt, n = "A story over HTTP/2", 20
    want, _, _ = native_text(addr, {"prompt": prompt, "max_tokens": n})
    start(page, args.h2_url, prompt, n)
    s = wait_end(page)
    proto = page.evaluate("() => performance.getEntriesByType('navigation')[0].nextHopProtocol")
    growth = [g for g in page.evaluate("() => window.__growth") if g[1] > 0]
    span = (growth[-1][0] - growth[0][0]) if growth else 0
    c.check("HTTP/2 through nginx (nginx-recommended.conf): page over h2, stream done token by token",
            proto == "h2" and s["state"] == "done" and s["out"] == want and len(growth) >= n - 2 and span >= 0.8 * (n - 1) * 50,
            f"protocol={proto}, state={s['state']}, {len(growth)} updates over {span:.0f} ms, {s['ttft']}")


with sync_playwright() as p, tempfile.TemporaryDirectory(prefix="sluice-chromium-") as profile:
    ctx = p.chromium.launch_persistent_context(
        profile,
        executable_path="/usr/bin/chromium",
        headless=True,
        args=FLAGS,
        ignore_https_errors=True,  # the h2 check's self-signed certificate
    )
    print(f"chromium {ctx.browser.version if ctx.browser else '?'}", flush=True)
    page = ctx.pages[0] if ctx.pages else ctx.new_page()
    console = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    c.scenario("same origin", lambda: same_origin(page))
    c.scenario("bare EventSource", lambda: bare_eventsource(page))
    c.scenario("stop", lambda: stop(page))
    c.scenario("cross-origin allowed", lambda: cross_origin_allowed(page))
    c.scenario("cross-origin refused", lambda: cross_origin_refused(page))
    c.scenario("server refusal", lambda: server_refusal(page))
    if args.cut_addr:
        c.scenario("EventSource resumes through a cut", lambda: eventsource_resumes_through_a_cut(page))
        c.scenario("demo page resumes through a cut", lambda: demo_page_resumes_through_a_cut(page))
    c.scenario("final figures", lambda: final_figures(page))
    if args.h2_url:
        c.scenario("http2", lambda: http2(page))
    errors = [m for m in console if m.startswith("pageerror")]
    c.check("no JavaScript exceptions on the page", not errors, "; ".join(errors))
    if console:
        print("console:", *console, sep="\n  ", flush=True)
    ctx.close()
c.finish()
