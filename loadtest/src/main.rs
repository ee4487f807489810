//! `sluice-load`: measures time to first token of a streaming LLM endpoint
//! under connection pressure. See loadtest/README.md.
//!
//! # Layout
//! - `cli` — flags, defaults, checks.
//! - `arrival` — closed/open loop pacing: seeded RNG, arrival processes, ramp-up.
//! - `request` — the target URL and the request bodies (flags, `--body`, JSON lines).
//! - `http` — response heads and incremental body framing (chunked, length, close).
//! - `sse` — the incremental event-stream parser.
//! - `events` — what an event means in the native and the OpenAI format.
//! - `exchange` — one request/response, sans-IO: bytes and `Instant`s in, a `Record` out.
//! - `transport` — non-blocking TCP with optional TLS (rustls).
//! - `engine` — the measuring event loop (mio): pacing, keep-alive, faults, timeouts.
//! - `holder` — child processes that hold `--hold-idle` streams open.
//! - `metrics` — scraping the server's Prometheus `/metrics`.
//! - `stats` — histograms, counters, series, goodput, server join.
//! - `report` — JSON and the summary table; `html` — the HTML page; `compare` — runs side by side.
//! - `progress` — CPU accounting and the live line.

mod arrival;
mod cli;
mod compare;
mod engine;
mod events;
mod exchange;
mod holder;
mod html;
mod http;
mod metrics;
mod progress;
mod report;
mod request;
mod sse;
mod stats;
mod transport;

use clap::Parser;
use cli::Args;
use serde_json::json;
use std::time::{Duration, Instant};

fn main() {
    let args = Args::parse();
    if let Err(e) = args.validate() {
        eprintln!("sluice-load: {e}");
        std::process::exit(2);
    }
    let result = if args.internal_holder {
        holder::run_child(&args)
    } else if !args.compare.is_empty() {
        compare::run(&args.compare, args.html.as_deref())
    } else {
        run(&args)
    };
    if let Err(e) = result {
        eprintln!("sluice-load: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let url = args.url.clone().unwrap_or_default();
    let target = request::Target::parse(&url)?;
    let tls_needed = target.tls
        || args
            .metrics_url
            .as_deref()
            .is_some_and(|u| u.starts_with("https:"));
    let tls = if tls_needed {
        Some(transport::tls_config(args.cacert.as_deref())?)
    } else {
        None
    };
    let bodies = request::Bodies::from_args(args, args.max_tokens)?;
    let slos = match &args.goodput {
        Some(g) => stats::parse_goodput(g)?,
        None => Vec::new(),
    };
    let progress = !args.no_progress && progress::stderr_is_tty();
    let wall_start = Instant::now();

    // 1. pressure first, so every measured stream sees it
    let holders = holder::Holders::spawn(args, &target)?;
    let mut warnings = Vec::new();
    let mut open_at_start = 0;
    if holders.target > 0 {
        if !holders.wait_open(args.hold_wait, progress) {
            warnings.push(format!(
                "only {} of {} held streams opened within {:?}; measuring anyway",
                holders.open(),
                holders.target,
                args.hold_wait
            ));
        }
        open_at_start = holders.open();
        eprintln!(
            "holding {open_at_start} streams in {} processes",
            holders.processes()
        );
    }

    // 2. the server's counters before
    let before = match &args.metrics_url {
        Some(m) => {
            Some(metrics::scrape(m, tls.as_ref()).map_err(|e| format!("--metrics-url: {e}"))?)
        }
        None => None,
    };

    // 3. the measured load
    let load = match (args.concurrency, args.rate) {
        (Some(c), _) => engine::Load::Closed { users: c },
        (None, Some(r)) => engine::Load::Open {
            arrivals: arrival::Arrivals::new(
                args.arrival,
                r,
                args.burstiness,
                args.ramp_up,
                args.seed,
            ),
            max_inflight: args.max_inflight,
        },
        (None, None) => unreachable!("validated"),
    };
    let plan = engine::Plan {
        target: target.clone(),
        tls: if target.tls { tls.clone() } else { None },
        format: args.format,
        headers: request::parse_headers(&args.headers),
        request_ids: !args.no_request_id,
        bodies,
        load,
        requests: args.requests,
        warmup: args.warmup,
        duration: args.duration,
        ramp_up: args.ramp_up,
        timeout: args.timeout,
        faults: engine::Faults {
            fraction: args.fault_fraction,
            disconnect_after: args.disconnect_after,
            slow_reader: args.slow_reader,
            stall: args.stall,
            resume_after: args.resume_after,
        },
        seed: args.seed,
        source_ip: args.source_ip,
        slos,
        progress,
        run_id: arrival::Rng::new(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                ^ ((std::process::id() as u64) << 32),
        )
        .next_u64(),
    };
    let held_open = || holders.open();
    let cpu_before = progress::cpu_time(false);
    let measure_start = Instant::now();
    let engine = engine::Engine::new(
        plan,
        engine::Sampler {
            held_open: &held_open,
        },
    )
    .map_err(|e| format!("cannot start the event loop: {e}"))?;
    let (stats, cpu_peak, busy) = engine
        .run()
        .map_err(|e| format!("event loop failed: {e}"))?;
    let measure_wall = measure_start.elapsed().as_secs_f64();
    let cpu_percent =
        100.0 * (progress::cpu_time(false) - cpu_before).as_secs_f64() / measure_wall.max(1e-9);

    // 4. the server's counters after, and how fast its open streams fall back
    let open_at_end = holders.open();
    let server = match (&args.metrics_url, &before) {
        (Some(m), Some(b)) => {
            let after =
                metrics::scrape(m, tls.as_ref()).map_err(|e| format!("--metrics-url: {e}"))?;
            let baseline = b.get("sluice_streams_open").unwrap_or(0.0) + open_at_end as f64
                - open_at_start as f64;
            let (settle, last) =
                metrics::settle(m, tls.as_ref(), baseline.max(0.0), Duration::from_secs(10));
            Some(metrics::server_json(b, &after, settle, last))
        }
        _ => None,
    };

    // 5. release the pressure
    let held = json!({
        "target": holders.target,
        "mode": format!("{:?}", args.hold_mode).to_lowercase(),
        "processes": holders.processes(),
        "open_at_start": open_at_start,
        "open_at_end": open_at_end,
        "reopened": holders.reopened(),
        "lost": (holders.target as u64).saturating_sub(open_at_end),
        "failed_opens": holders.failed(),
    });
    let had_holders = holders.target > 0;
    holders.stop();
    let holder_cpu = had_holders.then(|| {
        100.0 * progress::cpu_time(true).as_secs_f64()
            / wall_start.elapsed().as_secs_f64().max(1e-9)
    });

    if cpu_percent > 80.0 || busy > 0 {
        warnings.push(format!(
            "the measuring thread was busy ({cpu_percent:.0} % of a core on average, over 80 % in {busy} seconds): \
             latencies include the client's own queueing; lower the load or split it"
        ));
    }
    let info = report::RunInfo {
        config: config_json(args),
        wall_s: wall_start.elapsed().as_secs_f64(),
        held,
        client_cpu_percent: cpu_percent,
        client_cpu_peak: cpu_peak,
        client_busy_seconds: busy,
        holder_cpu_percent: holder_cpu,
        server,
        warnings,
    };
    let j = report::to_json(&stats, &info);
    print!("{}", report::table(&j));
    if let Some(p) = &args.json {
        let text = serde_json::to_string_pretty(&j).expect("JSON serializes");
        std::fs::write(p, text + "\n").map_err(|e| format!("--json {}: {e}", p.display()))?;
    }
    if let Some(p) = &args.html {
        std::fs::write(p, html::run_page(&j))
            .map_err(|e| format!("--html {}: {e}", p.display()))?;
    }
    Ok(())
}

fn config_json(a: &Args) -> serde_json::Value {
    json!({
        "url": a.url,
        "format": format!("{:?}", a.format).to_lowercase(),
        "model": a.model,
        "load": if a.concurrency.is_some() { "closed" } else { "open" },
        "concurrency": a.concurrency,
        "rate": a.rate,
        "arrival": a.rate.map(|_| format!("{:?}", a.arrival).to_lowercase()),
        "burstiness": a.rate.map(|_| a.burstiness),
        "requests": a.requests,
        "warmup": a.warmup,
        "duration_s": a.duration.map(|d| d.as_secs_f64()),
        "ramp_up_s": a.ramp_up.as_secs_f64(),
        "max_tokens": a.max_tokens,
        "timeout_s": a.timeout.as_secs_f64(),
        "seed": a.seed,
        "hold_idle": a.hold_idle,
        "fault_fraction": if a.faults_enabled() { Some(a.fault_fraction) } else { None },
        "disconnect_after": a.disconnect_after,
        "slow_reader_bps": a.slow_reader,
        "stall_ms": a.stall.map(|d| d.as_millis() as u64),
        "resume_after": a.resume_after,
        "goodput": a.goodput,
        "started_unix_s": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
    })
}
