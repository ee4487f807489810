//! The `sluice` binary: flags, logger, start the server. Nothing else.

use clap::Parser;
use sluice::{Config, Server};

fn main() {
    let cfg = Config::parse();
    sluice::logging::init(cfg.log_level.to_filter());
    let listen = cfg.listen;
    let server = match Server::bind(cfg, None) {
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
