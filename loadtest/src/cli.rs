//! Every flag, its default and its check, in one place (clap). `Args` is
//! what the user typed; `validate` turns mistakes into messages before
//! anything is sent.

use crate::arrival::ArrivalKind;
use crate::events::Format;
use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HoldMode {
    /// Stream and read everything (a normal, patient client).
    Read,
    /// Send the request, then never read (a consumer that stopped).
    Noread,
    /// Connect and never send a byte.
    Idle,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PromptOrder {
    RoundRobin,
    Random,
}

/// Load-test a streaming LLM endpoint: TTFT under connection pressure.
///
/// Works against sluice (native events) and any OpenAI-compatible server
/// (`--format openai`): vLLM, llama.cpp, TGI, … See loadtest/README.md.
#[derive(Debug, Clone, Parser)]
#[command(name = "sluice-load", version)]
pub struct Args {
    /// The streaming endpoint, e.g. http://127.0.0.1:8080/v1/chat/stream
    #[arg(long, required_unless_present = "compare")]
    pub url: Option<String>,

    /// Event format of the stream.
    #[arg(long, value_enum, default_value_t = Format::Native)]
    pub format: Format,
    /// `model` field of the request (OpenAI servers usually need it).
    #[arg(long)]
    pub model: Option<String>,

    // ---- load model
    /// Closed loop: this many streams at once, each followed at once by the next.
    #[arg(long, conflicts_with = "rate")]
    pub concurrency: Option<usize>,
    /// Open loop: requests per second, sent on schedule whatever the server does.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Open loop arrival process.
    #[arg(long, value_enum, default_value_t = ArrivalKind::Poisson)]
    pub arrival: ArrivalKind,
    /// Gamma shape for --arrival gamma (1 = Poisson, < 1 burstier).
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Measured requests (after the warm-up).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Stop sending new requests after this long (e.g. 30s, 2m, 500ms).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Closed loop: start the users evenly over this time. Open loop: the
    /// rate grows linearly from 0 to --rate over it.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub ramp_up: Duration,
    /// Requests sent first and not counted.
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Open loop: most streams in flight at once; later arrivals wait (and
    /// their wait shows in ttft_intended_ms).
    #[arg(long, default_value_t = 4096)]
    pub max_inflight: usize,
    /// A stream with no end after this long is counted as a timeout.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub timeout: Duration,
    /// Seed for arrivals, prompt order and fault assignment.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    // ---- requests
    /// Prompt text (one user message).
    #[arg(long, default_value = "Tell me a story about a lighthouse keeper.")]
    pub prompt: String,
    /// max_tokens of each measured request.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u64,
    /// A whole JSON request body, sent as is (overrides --prompt, --max-tokens).
    #[arg(long)]
    pub body: Option<String>,
    /// JSON-lines file: one object a line, e.g. {"prompt": "…", "max_tokens": 32}
    /// or {"messages": […]}; other fields are sent as they are.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// How lines of --prompts are picked.
    #[arg(long, value_enum, default_value_t = PromptOrder::RoundRobin)]
    pub prompt_order: PromptOrder,
    /// Extra request header, "Name: value" (repeatable), e.g. for auth.
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// Do not send an X-Request-Id (by default each request gets a unique one,
    /// joined with the server's figures when it echoes it).
    #[arg(long)]
    pub no_request_id: bool,
    /// PEM file of extra CA certificates for https (the web PKI roots are always trusted).
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// Bind the measuring connections to this local address (e.g. 127.0.0.9).
    #[arg(long)]
    pub source_ip: Option<std::net::IpAddr>,

    // ---- pressure
    /// Hold this many extra streams open for the whole run (in child processes).
    #[arg(long, default_value_t = 0)]
    pub hold_idle: usize,
    /// What a held stream does.
    #[arg(long, value_enum, default_value_t = HoldMode::Read)]
    pub hold_mode: HoldMode,
    /// max_tokens of a held stream's request.
    #[arg(long, default_value_t = 4096)]
    pub hold_max_tokens: u64,
    /// A whole JSON body for held streams (default: the measured request's
    /// body with --hold-max-tokens).
    #[arg(long)]
    pub hold_body: Option<String>,
    /// Held streams per child process (each child has its own fd limit and,
    /// on loopback, its own source address 127.0.0.2, 127.0.0.3, …).
    #[arg(long, default_value_t = 15_000)]
    pub hold_per_process: usize,
    /// Wait at most this long for the held streams to open before measuring.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    pub hold_wait: Duration,

    // ---- faults
    /// Faulty clients leave after this many tokens.
    #[arg(long)]
    pub disconnect_after: Option<u64>,
    /// Faulty clients read at most this many bytes per second.
    #[arg(long)]
    pub slow_reader: Option<u64>,
    /// Faulty clients stop reading for this long after their first token.
    #[arg(long, value_parser = parse_duration)]
    pub stall: Option<Duration>,
    /// Faulty clients drop the connection after this many tokens and resume
    /// with Last-Event-ID (needs a server with resume); every token must
    /// arrive exactly once.
    #[arg(long)]
    pub resume_after: Option<u64>,
    /// Share of measured requests given one of the faults above (picked at random, seeded).
    #[arg(long, default_value_t = 0.1)]
    pub fault_fraction: f64,

    // ---- server side
    /// Scrape this Prometheus endpoint before and after (e.g. http://127.0.0.1:8080/metrics).
    #[arg(long)]
    pub metrics_url: Option<String>,

    // ---- output
    /// Service-level objectives, e.g. ttft_ms:500,itl_ms:50 (itl_ms: a
    /// stream's mean gap; also itl_max_ms, total_ms, ttft_intended_ms).
    #[arg(long)]
    pub goodput: Option<String>,
    /// Write the results as JSON (stable keys).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML report with plots.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Compare earlier --json results side by side (with --html: on one chart).
    #[arg(long, num_args = 1.., value_name = "RUN.json")]
    pub compare: Vec<PathBuf>,
    /// No live progress line.
    #[arg(long)]
    pub no_progress: bool,

    // ---- internal: a child process holding streams
    #[arg(long, hide = true)]
    pub internal_holder: bool,
    #[arg(long, hide = true, default_value_t = 0)]
    pub holder_count: usize,
    #[arg(long, hide = true)]
    pub holder_source: Option<std::net::IpAddr>,
}

impl Args {
    /// Checks what clap cannot; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if !self.compare.is_empty() || self.internal_holder {
            return Ok(());
        }
        if self.concurrency.is_none() && self.rate.is_none() {
            return Err(
                "give a load: --concurrency C (closed loop) or --rate R (open loop)".into(),
            );
        }
        if self.concurrency == Some(0) {
            return Err("--concurrency must be at least 1".into());
        }
        if let Some(r) = self.rate {
            if !(r > 0.0 && r.is_finite()) {
                return Err("--rate must be a positive number".into());
            }
        }
        if self.requests.is_none() && self.duration.is_none() {
            return Err("bound the run: --requests N and/or --duration D".into());
        }
        if !(0.0..=1.0).contains(&self.fault_fraction) {
            return Err("--fault-fraction must be within 0..1".into());
        }
        if self.hold_per_process == 0 || self.hold_per_process > 19_000 {
            return Err("--hold-per-process must be within 1..19000 (the fd limit)".into());
        }
        if self.max_inflight == 0 {
            return Err("--max-inflight must be at least 1".into());
        }
        if let Some(b) = &self.hold_body {
            serde_json::from_str::<serde_json::Value>(b)
                .map_err(|e| format!("--hold-body is not JSON: {e}"))?;
        }
        if let Some(g) = &self.goodput {
            crate::stats::parse_goodput(g)?;
        }
        for h in &self.headers {
            if !h.contains(':') {
                return Err(format!("--header {h:?}: want \"Name: value\""));
            }
        }
        Ok(())
    }

    pub fn faults_enabled(&self) -> bool {
        self.disconnect_after.is_some()
            || self.slow_reader.is_some()
            || self.stall.is_some()
            || self.resume_after.is_some()
    }
}

/// `250ms`, `30s`, `2m`, `1h`, or plain seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 30s, 2m)"))?;
    if !(v >= 0.0 && v.is_finite()) {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn validation() {
        let p = |a: &[&str]| {
            let mut v = vec!["sluice-load", "--url", "http://127.0.0.1:1/x"];
            v.extend_from_slice(a);
            Args::try_parse_from(v)
                .map_err(|e| e.to_string())
                .and_then(|a| a.validate())
        };
        assert!(p(&["--concurrency", "2", "--requests", "3"]).is_ok());
        assert!(p(&["--rate", "5", "--duration", "1s"]).is_ok());
        assert!(p(&["--requests", "3"])
            .unwrap_err()
            .contains("--concurrency"));
        assert!(p(&["--concurrency", "2"])
            .unwrap_err()
            .contains("--requests"));
        assert!(p(&["--concurrency", "2", "--rate", "3", "--requests", "1"]).is_err());
        assert!(p(&["--concurrency", "2", "--requests", "1", "--goodput", "x"]).is_err());
    }
}
