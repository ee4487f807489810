//! The `sluice` binary: flags, logger, start the server. Nothing else.

use clap::{CommandFactory, FromArgMatches};
use sluice::{Config, Server};

fn main() {
    let matches = Config::command().get_matches();
    let mut cfg = Config::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let backend_given =
        matches.value_source("backend") != Some(clap::parser::ValueSource::DefaultValue);
    // Flags that depend on each other, and key files: a bad value is an
    // error naming the flag (exit 2), like a value clap refuses.
    let checked = cfg
        .settle(backend_given)
        .and_then(|()| sluice::auth::Auth::from_config(&cfg).map(drop));
    if let Err(e) = checked {
        eprintln!("sluice: {e}");
        std::process::exit(2);
    }
    sluice::logging::init(cfg.log_level.to_filter());
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
        Err(e) => {
            eprintln!("sluice: cannot start on {listen}: {e}");
            std::process::exit(1);
        }
    };
    // Written directly, whatever the log level: scripts read the port from it.
    eprintln!("sluice: listening on http://{}", server.local_addr());
    if let Err(e) = server.run() {
        eprintln!("sluice: event loop failed: {e}");
        std::process::exit(1);
    }
}
