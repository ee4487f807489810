//! `--threads N`: N event loops serving one port, and what they send each
//! other.
//!
//! One listening socket is bound (without `SO_REUSEPORT`, so a second
//! process on the same port fails with "address in use") and shared: each
//! loop registers its own handle of it (`try_clone`) in its own poll and
//! accepts from the one accept queue while the process is under
//! `--max-connections`. So no connection waits in a loop's backlog while
//! another loop has room, and a busy loop simply accepts later than an idle
//! one (chosen over `SO_REUSEPORT` listeners by measurement and for those
//! two reasons; README, "How it works").
//!
//! Loops share the metrics, the worker pool and the process-wide counts
//! ([`Limits`]); each has its own engine (slab, stream table, timer wheel,
//! buffer pool), its own ready list and its own mailbox woken by its
//! waker: a connection handed over by the engine (a resume or stop by id
//! of a stream another loop owns), the start of a drain, reloaded keys.
//! Loop 0 runs on the caller's thread and takes the signals.

use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Poll, Waker};

use super::sock::listen;
use super::{Common, Loop, LISTENER, WAKER};
use crate::auth::Auth;
use crate::backend::openai::{OpenAiBackend, UpstreamConfig};
use crate::backend::sim::SimPoolBackend;
use crate::backend::Backend;
use crate::config::{BackendKind, Config};
use crate::engine::Handoff;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::pool::Pool;

/// What one loop sends another.
pub(super) enum Msg {
    /// A connection for the loop that owns the stream it asked for.
    Adopt(TcpStream, Handoff),
    /// SIGTERM (or [`ShutdownHandle::shut_down`]): drain; a second one ends
    /// the drain at once.
    Drain,
    /// SIGHUP reloaded the API keys.
    Keys(Auth),
}

/// One loop's mailbox and waker.
pub(super) struct Peer {
    tx: Sender<Msg>,
    pub waker: Arc<Waker>,
}

impl Peer {
    /// Whether the loop got it (it has not exited).
    pub fn send(&self, msg: Msg) -> bool {
        self.tx.send(msg).is_ok() && self.waker.wake().is_ok()
    }
}

/// Every loop's [`Peer`], by loop index.
#[derive(Clone)]
pub(super) struct Peers(Arc<[Peer]>);

impl Deref for Peers {
    type Target = [Peer];
    fn deref(&self) -> &[Peer] {
        &self.0
    }
}

impl Peers {
    /// Sends `msg()` to every loop but `me`.
    pub fn send_others(&self, me: usize, msg: impl Fn() -> Msg) {
        for (i, p) in self.0.iter().enumerate() {
            if i != me {
                p.send(msg());
            }
        }
    }
}

/// Starts a graceful shutdown from another thread (what SIGTERM does).
#[derive(Clone)]
pub struct ShutdownHandle {
    peers: Peers,
}

impl ShutdownHandle {
    pub fn shut_down(&self) {
        for p in self.peers.iter() {
            p.send(Msg::Drain);
        }
    }
}

/// A bound server, ready to [`Server::run`]: `--threads` event loops on
/// one listening socket.
pub struct Server {
    loops: Vec<Loop>,
    peers: Peers,
    local_addr: SocketAddr,
    metrics: Arc<Metrics>,
}

impl Server {
    /// Binds `cfg.listen`. `backend` overrides `--backend` (tests use it to
    /// run a scripted backend on the pool).
    pub fn bind(cfg: Config, backend: Option<Arc<dyn Backend>>) -> io::Result<Server> {
        let cfg = Arc::new(cfg);
        let listener = listen(cfg.listen)?;
        let local_addr = listener.local_addr()?;
        let metrics = Arc::new(Metrics::default());
        let backend = make_backend(&cfg, backend)?;
        let auth =
            Auth::from_config(&cfg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        if !auth.keys.is_empty() {
            log::info!("API keys on: {} keys", auth.keys.len());
        }
        let pool = backend.map(|b| {
            Arc::new(Pool::new(
                cfg.workers as usize,
                cfg.queue_depth,
                b,
                metrics.clone(),
            ))
        });
        let redactor = crate::redact::from_config(&cfg, &metrics)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let store = crate::store::Store::start(
            &cfg.resume_store,
            cfg.resume_window_ms,
            super::relay_capacity(&cfg),
            metrics.clone(),
        );
        metrics
            .store_configured
            .store(store.is_some(), std::sync::atomic::Ordering::Relaxed);
        let common = Common {
            cfg: cfg.clone(),
            metrics: metrics.clone(),
            pool,
            limits: Arc::new(Limits::default()),
            auth,
            redactor,
            store,
        };
        let n = cfg.threads as usize;
        let mut parts = Vec::with_capacity(n);
        let mut peers = Vec::with_capacity(n);
        for _ in 0..n {
            let poll = Poll::new()?;
            let mut own = TcpListener::from_std(listener.try_clone()?);
            poll.registry()
                .register(&mut own, LISTENER, Interest::READABLE)?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
            let (tx, rx) = channel();
            peers.push(Peer { tx, waker });
            parts.push((poll, own, rx));
        }
        drop(listener);
        let peers = Peers(peers.into());
        let loops = parts
            .into_iter()
            .enumerate()
            .map(|(i, (poll, own, rx))| Loop::new(&common, i, n, poll, own, peers.clone(), rx))
            .collect();
        Ok(Server {
            loops,
            peers,
            local_addr,
            metrics,
        })
    }

    /// SIGTERM and SIGINT start a graceful shutdown (a second one ends the
    /// drain at once); SIGHUP reloads the API keys. Only the binary calls
    /// this: tests use [`Server::shutdown_handle`].
    pub fn handle_signals(&mut self) -> io::Result<()> {
        self.loops[0].handle_signals()
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            peers: self.peers.clone(),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server's counters, readable from other threads.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Runs every loop (loop 0 on this thread) until a graceful shutdown
    /// completes (`Ok`) or polling fails.
    pub fn run(self) -> io::Result<()> {
        let mut loops = self.loops.into_iter();
        let Some(first) = loops.next() else {
            return Ok(());
        };
        let mut threads = Vec::new();
        for (i, l) in loops.enumerate() {
            let t = std::thread::Builder::new()
                .name(format!("sluice-loop-{}", i + 1))
                .spawn(move || l.run());
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.peers.send_others(0, || Msg::Drain);
                    return Err(e);
                }
            }
        }
        let mut result = first.run();
        if result.is_err() {
            // The others must not serve on without loop 0.
            self.peers.send_others(0, || Msg::Drain);
        }
        for t in threads {
            match t.join() {
                Ok(r) => result = result.and(r),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        result
    }
}

/// The backend `--backend` (or the caller) names; `None`: the simulated
/// model paced inside the loops.
fn make_backend(
    cfg: &Config,
    backend: Option<Arc<dyn Backend>>,
) -> io::Result<Option<Arc<dyn Backend>>> {
    Ok(match (backend, cfg.backend) {
        (Some(b), _) => Some(b),
        (None, BackendKind::Sim) => None,
        (None, BackendKind::SimPool) => Some(Arc::new(SimPoolBackend {
            ttft: cfg.sim_ttft(),
            itl: cfg.sim_itl(),
            sim_tokens: cfg.sim_tokens,
        })),
        (None, BackendKind::Openai) => {
            let Some(url) = cfg.upstream_url.clone() else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "--backend openai needs --upstream-url (e.g. http://127.0.0.1:8081/v1)",
                ));
            };
            let backend = OpenAiBackend::new(UpstreamConfig {
                url,
                key: cfg.upstream_key.clone(),
                model: cfg.upstream_model.clone(),
                system_prompt: cfg.system_prompt.clone(),
                connect_timeout: Duration::from_millis(cfg.upstream_connect_timeout_ms),
                read_timeout: Duration::from_millis(cfg.upstream_read_timeout_ms),
                max_idle: cfg.workers as usize,
                ca_file: cfg.upstream_ca_file.clone(),
            })
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            Some(Arc::new(backend))
        }
    })
}
