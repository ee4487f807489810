//! Reachability of the upstream for `/readyz`: a small thread that runs a
//! check every interval (the OpenAI backend's asks `GET …/models` and
//! counts any HTTP answer as reachable), so that `ready()` never blocks.
//! The thread lives as long as its [`Probe`]: dropping it wakes the
//! thread, which exits after the check in progress (bounded by the
//! check's own timeouts).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

struct Shared {
    reachable: AtomicBool,
    stop: Mutex<bool>,
    wake: Condvar,
}

/// A running reachability probe; stops when dropped.
pub struct Probe {
    shared: Arc<Shared>,
    /// Not joined on drop (the owner's drop must not wait out a connect);
    /// kept for tests that watch the thread end.
    #[cfg_attr(not(test), allow(dead_code))]
    thread: Option<JoinHandle<()>>,
}

impl Probe {
    /// Runs `check` now and then every `interval`; it says whether the
    /// upstream answered (and bounds its own time). Reachable until the
    /// first check says no.
    pub fn start(
        what: String,
        check: impl FnMut() -> bool + Send + 'static,
        interval: Duration,
    ) -> Probe {
        let shared = Arc::new(Shared {
            reachable: AtomicBool::new(true),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-upstream-probe".into())
            .stack_size(128 * 1024)
            .spawn(move || run(&s, &what, check, interval))
            .map_err(|e| log::warn!("cannot start the upstream probe: {e}"))
            .ok();
        Probe { shared, thread }
    }

    /// What the last attempt found.
    pub fn reachable(&self) -> bool {
        self.shared.reachable.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn take_thread(&mut self) -> Option<JoinHandle<()>> {
        self.thread.take()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        *self.shared.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.shared.wake.notify_all();
    }
}

fn run(shared: &Shared, what: &str, mut check: impl FnMut() -> bool, interval: Duration) {
    loop {
        let ok = check();
        if shared.reachable.swap(ok, Ordering::Relaxed) != ok {
            if ok {
                log::warn!("upstream {what} is reachable again");
            } else {
                log::warn!("upstream {what} is unreachable; sluice runs and keeps trying");
            }
        }
        let stop = shared.stop.lock().unwrap_or_else(|e| e.into_inner());
        let (stop, _) = shared
            .wake
            .wait_timeout_while(stop, interval, |stop| !*stop)
            .unwrap_or_else(|e| e.into_inner());
        if *stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let until = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn follows_the_listener_and_stops_when_dropped() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connects = move || {
            std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(1),
            )
            .is_ok()
        };
        // A long interval: the drop, not the interval, ends the wait.
        let mut probe = Probe::start("test".into(), connects, Duration::from_secs(600));
        let thread = probe.take_thread().unwrap();
        assert!(probe.reachable());
        drop(probe);
        wait_for("the probe thread to exit", || thread.is_finished());
        thread.join().unwrap();

        drop(listener);
        let probe = Probe::start("test".into(), connects, Duration::from_millis(1));
        wait_for("unreachable", || !probe.reachable());
    }
}
