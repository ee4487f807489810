//! Logs to stderr that never block the event loop.
//!
//! `simple_logger` writes synchronously, and a stderr that nobody reads (a
//! full pipe) would stall every stream. So the `log` facade is served by a
//! small front that formats the line and hands it to a bounded channel; one
//! thread renders it through `simple_logger` onto stderr. When the channel is
//! full the line is dropped and counted (`sluice_log_lines_dropped_total`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::OnceLock;

use log::{Level, LevelFilter, Log, Metadata, Record};

static DROPPED: AtomicU64 = AtomicU64::new(0);
static LOGGER: OnceLock<Front> = OnceLock::new();

/// Lines waiting for stderr before new ones are dropped.
const QUEUE: usize = 8192;

struct Line {
    level: Level,
    target: String,
    text: String,
}

struct Front {
    tx: SyncSender<Line>,
    level: LevelFilter,
}

impl Log for Front {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = Line {
            level: record.level(),
            target: record.target().to_string(),
            text: record.args().to_string(),
        };
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger once per process; later calls only keep the first level.
pub fn init(level: LevelFilter) {
    let mut installed = false;
    LOGGER.get_or_init(|| {
        installed = true;
        let (tx, rx) = sync_channel::<Line>(QUEUE);
        std::thread::Builder::new()
            .name("sluice-log".into())
            .spawn(move || {
                let out = simple_logger::SimpleLogger::new()
                    .with_level(LevelFilter::Trace)
                    .with_utc_timestamps();
                for line in rx {
                    out.log(
                        &Record::builder()
                            .level(line.level)
                            .target(&line.target)
                            .args(format_args!("{}", line.text))
                            .build(),
                    );
                }
            })
            .expect("spawning the log thread");
        Front { tx, level }
    });
    if installed {
        if let Some(front) = LOGGER.get() {
            let _ = log::set_logger(front);
            log::set_max_level(level);
        }
    }
}

/// Lines dropped so far because stderr did not keep up.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Marks the calling thread as the event loop's (placeholder until batching lands).
pub fn mark_loop_thread() {}

/// The loop's writes for this turn are done (placeholder until batching lands).
pub fn end_of_turn() {}
