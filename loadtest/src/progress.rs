//! The process's own cost and the live line: CPU time from `getrusage`
//! (so a saturated client can warn that it measures itself) and a
//! one-line progress display on a terminal, rewritten in place.

use std::io::Write;
use std::time::{Duration, Instant};

/// CPU time (user + system) used so far by this process (`children`: by
/// its waited-for children).
pub fn cpu_time(children: bool) -> Duration {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let who = if children {
        libc::RUSAGE_CHILDREN
    } else {
        libc::RUSAGE_SELF
    };
    // SAFETY: getrusage writes into the struct we own.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// stderr is a terminal.
pub fn stderr_is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(2) == 1 }
}

/// Tracks CPU between samples.
#[derive(Debug)]
pub struct CpuMeter {
    last_cpu: Duration,
    last_at: Instant,
}

impl CpuMeter {
    pub fn new(now: Instant) -> Self {
        CpuMeter {
            last_cpu: cpu_time(false),
            last_at: now,
        }
    }

    /// CPU use since the last sample, in % of one core.
    pub fn sample(&mut self, now: Instant) -> f64 {
        let cpu = cpu_time(false);
        let wall = now.saturating_duration_since(self.last_at).as_secs_f64();
        let used = (cpu - self.last_cpu.min(cpu)).as_secs_f64();
        self.last_cpu = cpu;
        self.last_at = now;
        if wall > 0.0 {
            100.0 * used / wall
        } else {
            0.0
        }
    }
}

/// The live line: done, in flight, rate, p99 so far, held, CPU.
pub fn print_line(line: &str) {
    let mut e = std::io::stderr().lock();
    let _ = write!(e, "\r\x1b[2K{line}");
    let _ = e.flush();
}

pub fn end_line() {
    let _ = writeln!(std::io::stderr());
}
