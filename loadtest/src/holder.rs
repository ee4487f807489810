//! Connection pressure: `--hold-idle K` streams held open for the whole
//! run by child processes of this same binary (hidden `--internal-holder`
//! mode), so the measuring process keeps its fds and its CPU. Each child
//! holds at most `--hold-per-process` streams and, when the target is on
//! loopback, binds its own source address (127.0.0.2, 127.0.0.3, …) so the
//! ~28,000 ephemeral ports of one address are never the limit. A child
//! reports `open reopened failed` on stdout every 200 ms; it stops when its
//! stdin closes. A held stream the server ends is reopened.

use crate::cli::{Args, HoldMode};
use crate::events::Format;
use crate::exchange::{Exchange, Record, Step};
use crate::http::build_request;
use crate::request::{parse_headers, Bodies, Target};
use crate::transport::{self, Transport};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Connects in progress at once per child (the server's listen backlog is finite).
const MAX_CONNECTING: usize = 256;
/// Wait before reopening after a failure.
const BACKOFF: Duration = Duration::from_millis(500);

/// What one child last reported.
#[derive(Debug, Default)]
pub struct ChildCounts {
    pub open: AtomicU64,
    pub reopened: AtomicU64,
    pub failed: AtomicU64,
    pub alive: AtomicBool,
}

/// The parent's handle on the holder processes.
pub struct Holders {
    pub target: usize,
    children: Vec<(Child, Arc<ChildCounts>)>,
}

impl Holders {
    /// Starts the children (none when `args.hold_idle` is 0).
    pub fn spawn(args: &Args, target: &Target) -> Result<Holders, String> {
        let k = args.hold_idle;
        let mut children = Vec::new();
        if k == 0 {
            return Ok(Holders {
                target: 0,
                children,
            });
        }
        let n = k.div_ceil(args.hold_per_process);
        let exe = std::env::current_exe().map_err(|e| format!("cannot find my own binary: {e}"))?;
        let argv: Vec<String> = std::env::args().skip(1).collect();
        for i in 0..n {
            let count = k / n + usize::from(i < k % n);
            let mut cmd = Command::new(&exe);
            cmd.args(&argv)
                .arg("--internal-holder")
                .arg("--holder-count")
                .arg(count.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            if target.is_loopback() && target.addr.is_ipv4() {
                let ip = Ipv4Addr::new(127, 0, ((2 + i) / 250) as u8, (2 + i % 250) as u8);
                cmd.arg("--holder-source").arg(ip.to_string());
            }
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot start a holder process: {e}"))?;
            let counts = Arc::new(ChildCounts::default());
            counts.alive.store(true, Ordering::Relaxed);
            let out = child.stdout.take().expect("piped");
            let c = counts.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    let v: Vec<u64> = line
                        .split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect();
                    if let [open, reopened, failed] = v[..] {
                        c.open.store(open, Ordering::Relaxed);
                        c.reopened.store(reopened, Ordering::Relaxed);
                        c.failed.store(failed, Ordering::Relaxed);
                    }
                }
                c.alive.store(false, Ordering::Relaxed);
                c.open.store(0, Ordering::Relaxed);
            });
            children.push((child, counts));
        }
        Ok(Holders {
            target: k,
            children,
        })
    }

    pub fn open(&self) -> u64 {
        self.sum(|c| &c.open)
    }

    pub fn reopened(&self) -> u64 {
        self.sum(|c| &c.reopened)
    }

    pub fn failed(&self) -> u64 {
        self.sum(|c| &c.failed)
    }

    pub fn processes(&self) -> usize {
        self.children.len()
    }

    fn sum(&self, f: impl Fn(&ChildCounts) -> &AtomicU64) -> u64 {
        self.children
            .iter()
            .map(|(_, c)| f(c).load(Ordering::Relaxed))
            .sum()
    }

    /// Waits until every held stream is open, a child died, or `limit` passed.
    pub fn wait_open(&self, limit: Duration, progress: bool) -> bool {
        let start = Instant::now();
        loop {
            let open = self.open() as usize;
            if progress {
                crate::progress::print_line(&format!(
                    "holding: {open} of {} streams open ({} processes)",
                    self.target,
                    self.processes()
                ));
            }
            if open >= self.target {
                break;
            }
            let dead = self
                .children
                .iter()
                .any(|(_, c)| !c.alive.load(Ordering::Relaxed));
            if dead || start.elapsed() >= limit {
                if progress {
                    crate::progress::end_line();
                }
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if progress {
            crate::progress::end_line();
        }
        true
    }

    /// Closes the children's stdin, waits for them (then kills stragglers).
    pub fn stop(mut self) {
        for (child, _) in &mut self.children {
            drop(child.stdin.take());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (child, _) in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for (child, _) in &mut self.children {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

enum State {
    /// Waiting to (re)connect at this time.
    Waiting(Instant),
    Connecting,
    Open,
}

struct Held {
    t: Option<Transport>,
    state: State,
    written: usize,
    ex: Option<Exchange>,
}

/// The child: holds `args.holder_count` streams until stdin closes.
pub fn run_child(args: &Args) -> Result<(), String> {
    let target = Target::parse(args.url.as_deref().unwrap_or_default())?;
    let tls = if target.tls {
        Some(transport::tls_config(args.cacert.as_deref())?)
    } else {
        None
    };
    let body = match &args.hold_body {
        Some(b) => b.clone().into_bytes(),
        None => Bodies::from_args(args, args.hold_max_tokens)?
            .next_body()
            .to_vec(),
    };
    let headers = parse_headers(&args.headers);
    let request = build_request("POST", &target.path, &target.host_header, &headers, &body);
    let source: Option<IpAddr> = args.holder_source;
    let mode = args.hold_mode;
    let format: Format = args.format;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sink = [0u8; 64];
            let mut stdin = io::stdin();
            while let Ok(n) = stdin.read(&mut sink) {
                if n == 0 {
                    break;
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
    }

    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut events = Events::with_capacity(4096);
    let mut held: Slab<Held> = Slab::with_capacity(args.holder_count);
    let now = Instant::now();
    for _ in 0..args.holder_count {
        held.insert(Held {
            t: None,
            state: State::Waiting(now),
            written: 0,
            ex: None,
        });
    }
    let (mut reopened, mut failed) = (0u64, 0u64);
    let mut buf = vec![0u8; 64 * 1024];
    let mut next_report = Instant::now();
    let mut out = io::stdout().lock();
    loop {
        let now = Instant::now();
        // (Re)connect what is due, a bounded number at a time.
        let mut connecting = held
            .iter()
            .filter(|(_, h)| matches!(h.state, State::Connecting))
            .count();
        for (key, h) in held.iter_mut() {
            if connecting >= MAX_CONNECTING {
                break;
            }
            if let State::Waiting(at) = h.state {
                if at > now {
                    continue;
                }
                match transport::connect(target.addr, source).and_then(|s| {
                    Transport::new(s, tls.as_ref().map(|c| (c, target.host.as_str())))
                }) {
                    Ok(mut t) => {
                        if poll
                            .registry()
                            .register(
                                t.socket(),
                                Token(key),
                                Interest::READABLE | Interest::WRITABLE,
                            )
                            .is_ok()
                        {
                            h.t = Some(t);
                            h.state = State::Connecting;
                            h.written = 0;
                            connecting += 1;
                        } else {
                            failed += 1;
                            h.state = State::Waiting(now + BACKOFF);
                        }
                    }
                    Err(_) => {
                        failed += 1;
                        h.state = State::Waiting(now + BACKOFF);
                    }
                }
            }
        }
        if now >= next_report {
            let open = held
                .iter()
                .filter(|(_, h)| matches!(h.state, State::Open))
                .count();
            if writeln!(out, "{open} {reopened} {failed}")
                .and_then(|_| out.flush())
                .is_err()
            {
                return Ok(()); // the parent is gone
            }
            next_report = now + Duration::from_millis(200);
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
        }
        let _ = poll.poll(&mut events, Some(Duration::from_millis(50)));
        for ev in events.iter() {
            let key = ev.token().0;
            let Some(h) = held.get_mut(key) else { continue };
            let now = Instant::now();
            let closed = ev.is_read_closed() || ev.is_error();
            let ended = service(
                h,
                &request,
                mode,
                format,
                &mut buf,
                now,
                closed,
                &mut reopened,
            );
            match ended {
                None => {}
                Some(clean) => {
                    if let Some(mut t) = h.t.take() {
                        let _ = poll.registry().deregister(t.socket());
                    }
                    h.ex = None;
                    if clean {
                        reopened += 1;
                        h.state = State::Waiting(now);
                    } else {
                        failed += 1;
                        h.state = State::Waiting(now + BACKOFF);
                    }
                }
            }
        }
    }
}

/// Drives one held connection. `Some(true)`: the server ended the stream
/// (reopen now); `Some(false)`: it failed (reopen after a pause).
#[allow(clippy::too_many_arguments)]
fn service(
    h: &mut Held,
    request: &[u8],
    mode: HoldMode,
    format: Format,
    buf: &mut [u8],
    now: Instant,
    closed: bool,
    reopened: &mut u64,
) -> Option<bool> {
    let t = h.t.as_mut()?;
    if matches!(h.state, State::Connecting) {
        match t.connected() {
            Ok(false) => return None,
            Ok(true) => {
                h.state = State::Open;
                if mode != HoldMode::Idle {
                    h.ex = Some(Exchange::new(format, Record::new(false, now), None));
                }
            }
            Err(_) => return Some(false),
        }
    }
    if t.flush_tls().is_err() {
        return Some(false);
    }
    if mode != HoldMode::Idle {
        while h.written < request.len() {
            match t.write(&request[h.written..]) {
                Ok(n) if n > 0 => h.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                _ => return Some(false),
            }
        }
    }
    if mode == HoldMode::Read {
        loop {
            match t.read(buf) {
                Ok(0) => return Some(true),
                Ok(n) => {
                    let ex = h.ex.as_mut()?;
                    if let Step::Finished { keep_alive } = ex.on_bytes(&buf[..n], now) {
                        let ok = ex.rec.status == Some(200);
                        if keep_alive && ok {
                            // The same connection carries the next held stream.
                            h.written = 0;
                            *reopened += 1;
                            h.ex = Some(Exchange::new(format, Record::new(false, now), None));
                            return service_again(h, request);
                        }
                        return Some(ok);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(_) => return Some(false),
            }
        }
    }
    // noread / idle: only notice that the server closed the connection.
    if closed {
        return Some(true);
    }
    None
}

fn service_again(h: &mut Held, request: &[u8]) -> Option<bool> {
    let t = h.t.as_mut()?;
    while h.written < request.len() {
        match t.write(&request[h.written..]) {
            Ok(n) if n > 0 => h.written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            _ => return Some(false),
        }
    }
    None
}
