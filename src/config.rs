//! Every flag, default and limit in one place.
//!
//! Each flag also reads `SLUICE_<FLAG>` from the environment (clap's `env`),
//! so `--heartbeat-ms` and `SLUICE_HEARTBEAT_MS` are the same setting. The
//! rest of the server reads only [`Config`], never the environment. Tests
//! build theirs with [`Config::for_tests`], which never reads it either, so
//! a `SLUICE_*` variable in the shell running `cargo test` changes nothing.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

/// Which model produces the tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// The built-in simulated model, paced inside the event loop (no thread per stream).
    Sim,
    /// The simulated model run on the blocking worker pool, like an upstream call
    /// (exercises the worker hand-off; an extension of the contract).
    SimPool,
    /// An OpenAI-compatible upstream server (`--upstream-url`).
    Openai,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Log verbosity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn to_filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// sluice: streams LLM tokens to clients over Server-Sent Events.
///
/// Every flag can also be set through the environment variable named after
/// it: `--heartbeat-ms` ⇔ `SLUICE_HEARTBEAT_MS`.
#[derive(Debug, Clone, Parser)]
#[command(name = "sluice", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on: HOST:PORT (`localhost:8080`, `127.0.0.1:8080`,
    /// `[::1]:8080`), or `:PORT` for every interface; port 0 picks a free port.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "127.0.0.1:8080", value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// Which model produces the tokens.
    #[arg(long, env = "SLUICE_BACKEND", value_enum, default_value = "sim")]
    pub backend: BackendKind,

    /// Delay before the first simulated token, in ms.
    #[arg(long, env = "SLUICE_SIM_TTFT_MS", default_value_t = 50)]
    pub sim_ttft_ms: u64,

    /// Delay between simulated tokens, in ms.
    #[arg(long, env = "SLUICE_SIM_ITL_MS", default_value_t = 20)]
    pub sim_itl_ms: u64,

    /// Length of a simulated answer, in tokens.
    #[arg(long, env = "SLUICE_SIM_TOKENS", default_value_t = 64)]
    pub sim_tokens: u32,

    /// Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8081/v1.
    #[arg(long, env = "SLUICE_UPSTREAM_URL")]
    pub upstream_url: Option<String>,

    /// API key sent upstream as `Authorization: Bearer KEY`.
    #[arg(long, env = "SLUICE_UPSTREAM_KEY", hide_env_values = true)]
    pub upstream_key: Option<String>,

    /// Model name sent upstream; when set it replaces the request's `model`.
    #[arg(long, env = "SLUICE_UPSTREAM_MODEL")]
    pub upstream_model: Option<String>,

    /// A model clients may ask for (repeatable; none: any). Others get 400
    /// `model_not_allowed`; `/v1/models` lists these.
    #[arg(long, env = "SLUICE_ALLOW_MODEL", value_delimiter = '\n')]
    pub allow_model: Vec<String>,

    /// A request field removed before forwarding upstream (repeatable), e.g.
    /// `service_tier`, `store`, `reasoning_effort`.
    #[arg(long, env = "SLUICE_DROP_FIELD", value_delimiter = '\n')]
    pub drop_field: Vec<String>,

    /// Time to connect to the upstream, in ms.
    #[arg(long, env = "SLUICE_UPSTREAM_CONNECT_TIMEOUT_MS", default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..))]
    pub upstream_connect_timeout_ms: u64,

    /// Longest silence between two bytes from the upstream, in ms.
    #[arg(long, env = "SLUICE_UPSTREAM_READ_TIMEOUT_MS", default_value_t = 30000, value_parser = clap::value_parser!(u64).range(1..))]
    pub upstream_read_timeout_ms: u64,

    /// PEM file of CA certificates to trust for an https upstream (default:
    /// the bundled web roots).
    #[arg(long, env = "SLUICE_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<std::path::PathBuf>,

    /// Prepended to every conversation as a system message when set.
    #[arg(long, env = "SLUICE_SYSTEM_PROMPT")]
    pub system_prompt: Option<String>,

    /// Blocking worker threads = concurrent upstream generations.
    #[arg(long, env = "SLUICE_WORKERS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub workers: u32,

    /// Event loops serving the port, each on its own thread (at most 64).
    /// The limits stay process-wide.
    #[arg(long, env = "SLUICE_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub threads: u32,

    /// Before sleeping in epoll, poll without sleeping for up to this many
    /// microseconds (0 = off): trades CPU for the cost of a wake-up.
    /// Measured on the project's VM in BENCHMARKS.md.
    #[arg(long, env = "SLUICE_SPIN_US", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub spin_us: u64,

    /// Requests that may wait for a worker; beyond it: 503 overloaded.
    #[arg(long, env = "SLUICE_QUEUE_DEPTH", default_value_t = 256)]
    pub queue_depth: usize,

    /// A heartbeat is sent after this long without any other event, in ms.
    #[arg(long, env = "SLUICE_HEARTBEAT_MS", default_value_t = 15000, value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_ms: u64,

    /// The largest `max_tokens` a request may ask for.
    #[arg(long, env = "SLUICE_MAX_TOKENS_LIMIT", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens_limit: u32,

    /// Most connections held at once [default: the fd limit - 256]. At it the
    /// server closes its longest-idle keep-alive connection to admit a new
    /// one; with none idle it stops accepting until connections close.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Most connections from one client address; beyond it a new connection
    /// gets 429 too_many_connections and is closed. 0: no limit.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,

    /// Most bytes of request bodies (and unread request input) the server
    /// holds at once; a body that does not fit waits in TCP, unread, until
    /// others finish. At least --max-body-bytes.
    #[arg(long, env = "SLUICE_MAX_BUFFERED_BYTES", default_value_t = 268_435_456)]
    pub max_buffered_bytes: usize,

    /// Most streams running at once [default: = max-connections]; beyond it: 503 overloaded.
    #[arg(long, env = "SLUICE_MAX_STREAMS")]
    pub max_streams: Option<usize>,

    /// Largest request head in bytes (431 beyond).
    #[arg(long, env = "SLUICE_MAX_HEAD_BYTES", default_value_t = 16384)]
    pub max_head_bytes: usize,

    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "SLUICE_MAX_BODY_BYTES", default_value_t = 1_048_576)]
    pub max_body_bytes: usize,

    /// Time a client has to send a request's head and body, in ms (408 after it).
    #[arg(long, env = "SLUICE_HEADER_TIMEOUT_MS", default_value_t = 10000, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout_ms: u64,

    /// An idle keep-alive connection is closed after this long, in ms.
    #[arg(long, env = "SLUICE_IDLE_TIMEOUT_MS", default_value_t = 60000, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_ms: u64,

    /// A stream whose client accepts no byte this long is dropped (slow_consumer), in ms.
    #[arg(long, env = "SLUICE_WRITE_TIMEOUT_MS", default_value_t = 30000, value_parser = clap::value_parser!(u64).range(1..))]
    pub write_timeout_ms: u64,

    /// A stream running longer ends with deadline_exceeded, in ms.
    #[arg(long, env = "SLUICE_MAX_STREAM_MS", default_value_t = 600_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_stream_ms: u64,

    /// Origins allowed to call from a browser on another origin (repeatable,
    /// or `*`); none: no CORS headers are sent.
    #[arg(long, env = "SLUICE_CORS_ORIGIN", value_delimiter = '\n')]
    pub cors_origin: Vec<String>,

    /// Answer without streaming: one JSON document per request (the feature flag).
    #[arg(long, env = "SLUICE_NO_STREAMING", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_streaming: bool,

    /// On SIGTERM/SIGINT, running streams may finish for this long (ms); the
    /// rest then end with `shutting_down`.
    #[arg(long, env = "SLUICE_DRAIN_MS", default_value_t = 10000)]
    pub drain_ms: u64,

    /// Output bytes buffered per connection before the stream stops taking
    /// tokens (backpressure). An extension of the contract.
    #[arg(long, env = "SLUICE_OUTPUT_HIGH_WATER", default_value_t = 16384, value_parser = clap::value_parser!(u64).range(256..))]
    pub output_high_water: u64,

    /// Resume: a stream whose client leaves keeps running this long (ms) so
    /// the client can reconnect with `Last-Event-ID`; a finished stream's
    /// events are kept as long. 0: off (a disconnect cancels at once).
    #[arg(long, env = "SLUICE_RESUME_WINDOW_MS", default_value_t = 0)]
    pub resume_window_ms: u64,

    /// Resume: the most bytes of events one stream keeps for replay.
    #[arg(long, env = "SLUICE_RESUME_BUFFER_BYTES", default_value_t = 524_288, value_parser = clap::value_parser!(u64).range(1024..))]
    pub resume_buffer_bytes: u64,

    /// Resume: the most bytes of events the process keeps for replay; past
    /// it the oldest detached streams are cancelled.
    #[arg(long, env = "SLUICE_RESUME_TOTAL_BYTES", default_value_t = 268_435_456)]
    pub resume_total_bytes: u64,

    /// Resume: where resumable streams are shared with other instances,
    /// so a client can resume, and stop, a stream on any of them:
    /// `memory` (this process only) or
    /// `redis://[USER:PASS@]HOST:PORT[/DB]` / `rediss://…` (the password
    /// never reaches a log). Needs `--resume-window-ms`.
    /// (Checked in [`Config::settle`], so that a bad value's password is
    /// not echoed by the argument parser.)
    #[arg(
        long = "resume-store",
        env = "SLUICE_RESUME_STORE",
        default_value = "memory",
        hide_env_values = true,
        hide_default_value = false
    )]
    pub resume_store_arg: String,

    /// `--resume-store`, parsed.
    #[arg(skip)]
    pub resume_store: StoreSpec,

    /// Redact text matching this regex before it is sent (repeatable;
    /// matches must be bounded, e.g. `sk-[A-Za-z0-9]{20,64}`).
    /// `SLUICE_REDACT` holds one per line.
    #[arg(long, env = "SLUICE_REDACT", value_delimiter = '\n')]
    pub redact: Vec<String>,

    /// Redact e-mail addresses, card numbers that pass Luhn, and OpenAI,
    /// AWS, GitHub, Slack and JWT token shapes.
    #[arg(long, env = "SLUICE_REDACT_BUILTIN", value_parser = clap::builder::BoolishValueParser::new())]
    pub redact_builtin: bool,

    /// What a redacted match is replaced with.
    #[arg(long, env = "SLUICE_REDACT_REPLACEMENT", default_value = "[REDACTED]")]
    pub redact_replacement: String,

    /// Allow `--redact` patterns whose matches can be unbounded, holding at
    /// most this many bytes back (a longer match leaks past its first N bytes).
    #[arg(long, env = "SLUICE_REDACT_MAX_HOLD")]
    pub redact_max_hold: Option<usize>,

    /// An API key clients must present (repeatable; none: auth is off).
    /// Principals `key-1`, `key-2`, … in order. `SLUICE_API_KEY` holds one
    /// key per line.
    #[arg(
        long,
        env = "SLUICE_API_KEY",
        value_delimiter = '\n',
        hide_env_values = true
    )]
    pub api_key: Vec<String>,

    /// A file of API keys, `name:key` per line (`#` comments); reloaded on
    /// SIGHUP (a bad file keeps the old keys).
    #[arg(long, env = "SLUICE_API_KEY_FILE")]
    pub api_key_file: Option<std::path::PathBuf>,

    /// A key `/metrics` requires (none: `/metrics` is open).
    #[arg(long, env = "SLUICE_METRICS_KEY", hide_env_values = true)]
    pub metrics_key: Option<String>,

    /// Log verbosity (logs go to stderr and never block streaming).
    #[arg(long, env = "SLUICE_LOG_LEVEL", value_enum, default_value = "info")]
    pub log_level: LogLevel,

    /// Log lines as text, or as one JSON object per line (time, level,
    /// target, message; access lines also method, path, status, request_id,
    /// peer, principal, stream, outcome, tokens, ttft_ms, duration_ms).
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl Config {
    /// The defaults, as `sluice` with no flags and no environment would use.
    pub fn defaults() -> Config {
        Config::for_tests(&[])
    }

    /// The config that `flags` give, read from them alone: unlike
    /// `Config::parse_from`, no `SLUICE_*` variable is consulted, so a test
    /// means the same whatever the environment. Panics on a bad flag (tests
    /// only; the binary uses `Config::parse`).
    pub fn for_tests(flags: &[&str]) -> Config {
        let matches = Config::command_without_env()
            .try_get_matches_from(std::iter::once("sluice").chain(flags.iter().copied()))
            .unwrap_or_else(|e| panic!("Config::for_tests({flags:?}): {e}"));
        Config::from_arg_matches(&matches)
            .unwrap_or_else(|e| panic!("Config::for_tests({flags:?}): {e}"))
    }

    /// The flags' parser with every `env` fallback removed.
    fn command_without_env() -> clap::Command {
        Config::command().mut_args(|a| a.env(None::<&str>))
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
    pub fn max_stream(&self) -> Duration {
        Duration::from_millis(self.max_stream_ms)
    }
    pub fn sim_ttft(&self) -> Duration {
        Duration::from_millis(self.sim_ttft_ms)
    }
    pub fn sim_itl(&self) -> Duration {
        Duration::from_millis(self.sim_itl_ms)
    }
    pub fn high_water(&self) -> usize {
        self.output_high_water as usize
    }

    pub fn limits(&self) -> crate::http::Limits {
        crate::http::Limits {
            max_head_bytes: self.max_head_bytes,
            max_body_bytes: self.max_body_bytes,
        }
    }

    /// `--max-connections`, or what the fd limit allows.
    pub fn effective_max_connections(&self) -> usize {
        self.max_connections
            .unwrap_or_else(|| fd_limit().saturating_sub(256).max(16))
    }

    /// `--max-streams`, or `--max-connections`.
    pub fn effective_max_streams(&self) -> usize {
        self.max_streams
            .unwrap_or_else(|| self.effective_max_connections())
    }
}

/// `HOST:PORT` (a name resolves to its first address, IPv4 first) or
/// `:PORT` (every IPv4 interface).
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: the port must be a number from 0 to 65535"))?;
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("{s:?}: expected HOST:PORT or :PORT ({e})"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{s:?}: the name has no address"))
}

impl Config {
    /// Checks the flags that depend on each other; the error names a flag.
    /// `backend_given`: `--backend` was set explicitly (not its default),
    /// so `--upstream-url` alone selects the openai backend.
    pub fn settle(&mut self, backend_given: bool) -> Result<(), String> {
        if self.max_buffered_bytes < self.max_body_bytes {
            return Err(format!(
                "--max-buffered-bytes ({}) must be at least --max-body-bytes ({})",
                self.max_buffered_bytes, self.max_body_bytes
            ));
        }
        self.resume_store = StoreSpec::parse(&self.resume_store_arg)?;
        if self.resume_store != StoreSpec::Memory && self.resume_window_ms == 0 {
            return Err(format!(
                "--resume-store {} needs --resume-window-ms (streams are resumable only then)",
                self.resume_store
            ));
        }
        match (self.backend, &self.upstream_url, backend_given) {
            (BackendKind::Openai, None, _) => {
                return Err(
                    "--backend openai needs --upstream-url (e.g. http://127.0.0.1:8081/v1)".into(),
                )
            }
            (BackendKind::Openai, Some(_), _) => {}
            (_, Some(_), false) => self.backend = BackendKind::Openai,
            (b, Some(_), true) => {
                return Err(format!(
                    "--upstream-url is only used with --backend openai (got --backend {})",
                    b.to_possible_value()
                        .map_or("?".into(), |v| v.get_name().to_string())
                ))
            }
            (_, None, _) => {}
        }
        Ok(())
    }
}

/// The soft limit on open file descriptors of this process.
pub fn fd_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return 1 << 20;
    }
    lim.rlim_cur as usize
}

// ---- --resume-store ----

/// Where resumable streams are kept besides each instance's memory.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum StoreSpec {
    /// Only in-process (the default).
    #[default]
    Memory,
    /// A Redis server: `url` as given, `shown` with the password masked.
    Redis { url: String, shown: String },
}

impl std::fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_string())
    }
}

impl std::fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSpec::Memory => f.write_str("memory"),
            StoreSpec::Redis { shown, .. } => f.write_str(shown),
        }
    }
}

impl StoreSpec {
    /// `memory`, `redis://[USER:PASS@]HOST[:PORT][/DB]` or `rediss://…`.
    pub fn parse(s: &str) -> Result<StoreSpec, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("memory") {
            return Ok(StoreSpec::Memory);
        }
        let bad = |why: &str| {
            format!("--resume-store: {why} (want memory, redis://[USER:PASS@]HOST:PORT[/DB] or rediss://…)")
        };
        let Ok(mut u) = url::Url::parse(s) else {
            return Err(bad("not a URL"));
        };
        if !matches!(u.scheme(), "redis" | "rediss") {
            return Err(bad(&format!("unknown scheme {:?}", u.scheme())));
        }
        if u.host_str().is_none_or(str::is_empty) {
            return Err(bad("no host"));
        }
        let db = u.path().trim_start_matches('/');
        if !db.is_empty() && db.parse::<u32>().is_err() {
            return Err(bad(&format!("database {db:?} is not a number")));
        }
        if u.query().is_some() || u.fragment().is_some() {
            return Err(bad("no query or fragment allowed"));
        }
        let url = s.to_string();
        if u.password().is_some() {
            let _ = u.set_password(Some("***"));
        }
        Ok(StoreSpec::Redis {
            url,
            shown: u.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::defaults();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.backend, BackendKind::Sim);
        assert_eq!(c.sim_ttft_ms, 50);
        assert_eq!(c.sim_itl_ms, 20);
        assert_eq!(c.sim_tokens, 64);
        assert_eq!(c.workers, 16);
        assert_eq!(c.queue_depth, 256);
        assert_eq!(c.heartbeat_ms, 15000);
        assert_eq!(c.max_tokens_limit, 4096);
        assert_eq!(c.max_head_bytes, 16384);
        assert_eq!(c.max_body_bytes, 1_048_576);
        assert_eq!(c.header_timeout_ms, 10000);
        assert_eq!(c.idle_timeout_ms, 60000);
        assert_eq!(c.write_timeout_ms, 30000);
        assert_eq!(c.max_stream_ms, 600_000);
        assert_eq!(c.max_connections_per_ip, 0);
        assert_eq!(c.max_buffered_bytes, 256 << 20);
        assert_eq!(c.effective_max_streams(), c.effective_max_connections());
    }

    #[test]
    fn listen_addresses() {
        let cases = [
            ("127.0.0.1:0", Some("127.0.0.1:0")),
            (":8080", Some("0.0.0.0:8080")),
            ("localhost:8080", Some("127.0.0.1:8080")),
            ("[::1]:9", Some("[::1]:9")),
            (":x", None),
            ("8080", None),
            (":70000", None),
        ];
        for (arg, want) in cases {
            let got = parse_listen(arg).ok().map(|a| a.to_string());
            assert_eq!(got.as_deref(), want, "{arg}");
        }
    }

    #[test]
    fn the_request_budget_holds_at_least_one_body() {
        let mut c = Config::for_tests(&["--max-buffered-bytes", "1000"]);
        let e = c.settle(false).unwrap_err();
        assert!(
            e.contains("--max-buffered-bytes") && e.contains("--max-body-bytes"),
            "{e}"
        );
        let mut c =
            Config::for_tests(&["--max-buffered-bytes", "1000", "--max-body-bytes", "1000"]);
        c.settle(false).unwrap();
    }

    #[test]
    fn upstream_url_selects_or_refuses_the_backend() {
        let url = ["--upstream-url", "http://127.0.0.1:1/v1"];
        let mut c = Config::for_tests(&url);
        c.settle(false).unwrap();
        assert_eq!(c.backend, BackendKind::Openai);
        let mut c = Config::for_tests(&[&url[..], &["--backend", "sim"]].concat());
        let e = c.settle(true).unwrap_err();
        assert!(e.contains("--backend openai"), "{e}");
        let mut c = Config::for_tests(&["--backend", "openai"]);
        assert!(c.settle(true).unwrap_err().contains("--upstream-url"));
        let mut c = Config::for_tests(&[]);
        c.settle(false).unwrap();
        assert_eq!(c.backend, BackendKind::Sim);
    }

    #[test]
    fn flags_parse() {
        let c = Config::for_tests(&[
            "--listen",
            "127.0.0.1:0",
            "--sim-ttft-ms",
            "0",
            "--max-streams",
            "5",
        ]);
        assert_eq!(c.listen.port(), 0);
        assert_eq!(c.sim_ttft_ms, 0);
        assert_eq!(c.effective_max_streams(), 5);
    }

    #[test]
    fn for_tests_reads_no_environment() {
        // Setting a SLUICE_* variable here would race the other tests of
        // this process; instead: the parser behind `for_tests` has no env
        // fallback on any flag, while the binary's has them.
        let with_env = Config::command();
        let env_flags = with_env
            .get_arguments()
            .filter(|a| a.get_env().is_some())
            .count();
        assert!(env_flags > 20, "the binary's flags read SLUICE_*");
        let cmd = Config::command_without_env();
        assert_eq!(
            cmd.get_arguments().count(),
            with_env.get_arguments().count()
        );
        for a in cmd.get_arguments() {
            assert_eq!(a.get_env(), None, "--{} reads the environment", a.get_id());
        }
    }

    #[test]
    fn for_tests_takes_the_flags_it_is_given() {
        let c = Config::for_tests(&["--sim-tokens", "3", "--no-streaming", "--cors-origin", "*"]);
        assert_eq!(c.sim_tokens, 3);
        assert!(c.no_streaming);
        assert_eq!(c.cors_origin, ["*"]);
        assert_eq!(c.heartbeat_ms, 15000);
        // As on the command line, a flag given twice is refused.
        let twice =
            std::panic::catch_unwind(|| Config::for_tests(&["--workers", "2", "--workers", "3"]));
        assert!(twice.is_err());
    }

    #[test]
    #[should_panic(expected = "Config::for_tests([\"--heartbeat-ms\", \"soon\"])")]
    fn for_tests_panics_on_a_bad_flag() {
        Config::for_tests(&["--heartbeat-ms", "soon"]);
    }

    #[test]
    fn parses_the_forms_and_never_shows_a_password() {
        let ok = [
            ("memory", "memory"),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://localhost/2", "redis://localhost/2"),
            ("redis://:s3cret@h:1/0", "redis://:***@h:1/0"),
            ("redis://bob:s3cret@h:1", "redis://bob:***@h:1"),
            ("rediss://bob:s3cret@h", "rediss://bob:***@h"),
        ];
        for (input, shown) in ok {
            let spec = StoreSpec::parse(input).unwrap();
            assert_eq!(spec.to_string(), shown, "{input}");
            assert_eq!(format!("{spec:?}"), shown, "{input}");
            assert!(!format!("{spec:?}").contains("s3cret"));
        }
        let bad = [
            "",
            "redis",
            "http://h:1",
            "redis://",
            "redis://h:1/x",
            "redis://h:1/?a=b",
            "memcached://h",
        ];
        for input in bad {
            assert!(StoreSpec::parse(input).is_err(), "{input:?} accepted");
        }
    }
}
