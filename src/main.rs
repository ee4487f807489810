//! The `sluice` binary: flags, logger, start the server. Nothing else.

use std::time::Duration;

use clap::{CommandFactory, FromArgMatches};
use sluice::{Config, Server};

/// How long the queued log lines (the shutdown's, or what led to an error)
/// may hold the exit; a blocked stderr holds it no longer.
const LOG_FLUSH: Duration = Duration::from_millis(100);

fn main() {
    let matches = Config::command().get_matches();
    let mut cfg = Config::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let backend_given =
        matches.value_source("backend") != Some(clap::parser::ValueSource::DefaultValue);
    // Flags that depend on each other, and key files: a bad value is an
    // error naming the flag (exit 2), like a value clap refuses.
    let checked = cfg
        .settle(backend_given)
        .and_then(|()| sluice::auth::Auth::from_config(&cfg).map(drop))
        .and_then(|()| {
            let metrics = std::sync::Arc::new(sluice::metrics::Metrics::default());
            sluice::redact::from_config(&cfg, &metrics).map(drop)
        });
    if let Err(e) = checked {
        eprintln!("sluice: {e}");
        std::process::exit(2);
    }
    let format = match cfg.log_format {
        sluice::config::LogFormat::Text => sluice::logging::Format::Text,
        sluice::config::LogFormat::Json => sluice::logging::Format::Json,
    };
    sluice::logging::init_with(cfg.log_level.to_filter(), format);
    let listen = cfg.listen;
    let fd_limit = sluice::config::fd_limit();
    let max_conns = cfg.effective_max_connections();
    log::info!(
        "fd limit {fd_limit}: up to {max_conns} connections and {} streams",
        cfg.effective_max_streams()
    );
    if max_conns + 16 > fd_limit {
        log::warn!("--max-connections {max_conns} leaves too few of the {fd_limit} file descriptors for listening, logging and workers");
    }
    let server = match Server::bind(cfg, None).and_then(|mut s| s.handle_signals().map(|()| s)) {
        Ok(s) => s,
        Err(e) => exit_with(&format!("cannot start on {listen}: {e}")),
    };
    // Written directly, whatever the log level: scripts read the port from it.
    // One `write` (stderr is unbuffered: formatting straight into it wrote
    // the address piece by piece, and a script reading the line could see
    // half of it).
    let line = format!("sluice: listening on http://{}\n", server.local_addr());
    eprint!("{line}");
    let result = server.run();
    // The lines the loop queued last (the shutdown's) are otherwise lost
    // when the process exits.
    sluice::logging::flush(LOG_FLUSH);
    if let Err(e) = result {
        exit_with(&format!("event loop failed: {e}"));
    }
}

/// Exits with status 1 after the queued log lines, then `why`.
fn exit_with(why: &str) -> ! {
    sluice::logging::flush(LOG_FLUSH);
    eprintln!("sluice: {why}");
    std::process::exit(1);
}
