//! The upstream HTTP/1.1 client: one `POST` at a time per connection over
//! `std::net` (+ `rustls` for https), its response head parsed with
//! `httparse` and its body de-framed as strictly as the server reads
//! requests, connections kept alive and reused.
//!
//! It is written here rather than taken from an HTTP client crate because
//! the server needs two things those do not offer together: a timeout on
//! the *silence between two bytes* (`set_read_timeout` on the socket, not a
//! total budget), and cancelling a worker blocked in `read` within
//! milliseconds (the caller's [`Interrupt`] is handed a clone of the socket,
//! which a cancel shuts down).
//!
//! It knows nothing of models, streams or the pool: the OpenAI backend
//! (`backend::openai`) builds the request and reads the body.
//!
//! - [`head`]: the response head and its framing decisions (pure).
//! - `conn`: connecting, TLS, and the buffered response reader.
//! - [`probe`]: the reachability thread behind `/readyz`.

mod conn;
pub mod head;
pub mod probe;

use std::fmt;
use std::io;
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conn::{Conn, Target};
use head::Head;

/// What may interrupt a request: the client polls `is_cancelled` while it
/// connects, and registers every socket it uses, so that a cancel can shut
/// it down and a blocked read or write returns at once.
pub trait Interrupt {
    fn is_cancelled(&self) -> bool;
    /// The socket in use, or `None` once the connection is back in the
    /// keep-alive pool (a later cancel must not touch it there).
    fn set_socket(&self, sock: Option<TcpStream>);
}

/// An [`Interrupt`] that never interrupts (a probe has no client to lose).
pub struct Never;

impl Interrupt for Never {
    fn is_cancelled(&self) -> bool {
        false
    }
    fn set_socket(&self, _sock: Option<TcpStream>) {}
}

/// Why a request failed.
#[derive(Debug)]
pub enum Error {
    /// Resolving, connecting or the TLS handshake failed: nothing was sent.
    Connect(String),
    /// Nothing could be read (or written) for the read timeout.
    Timeout,
    /// The response broke HTTP/1.1 framing; the reason is a short phrase.
    Protocol(&'static str),
    /// The connection failed or closed mid-exchange (TLS errors included).
    Io(io::Error),
    /// The caller's [`Interrupt`] was cancelled.
    Cancelled,
}

impl Error {
    fn from_io(e: io::Error) -> Error {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout,
            _ => Error::Io(e),
        }
    }

    /// Whether it says a kept-alive connection was already closed by the
    /// upstream (then, and only then, the request is sent again).
    fn is_dead_connection(&self) -> bool {
        matches!(self, Error::Io(e) if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::NotConnected
        ))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect(m) => f.write_str(m),
            Error::Timeout => f.write_str("timed out"),
            Error::Protocol(reason) => write!(f, "bad response: {reason}"),
            Error::Io(e) => write!(f, "{e}"),
            Error::Cancelled => f.write_str("cancelled"),
        }
    }
}

impl std::error::Error for Error {}

/// Why the client cannot be built from its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetupError {
    /// The URL (said in the message).
    Url(String),
    /// The CA file (said in the message).
    CaFile(String),
    Tls(String),
}

/// How the client connects and waits.
#[derive(Debug, Clone)]
pub struct Options {
    pub connect_timeout: Duration,
    /// Longest silence between two bytes.
    pub read_timeout: Duration,
    /// Keep-alive connections kept for reuse.
    pub max_idle: usize,
    /// PEM file of CA certificates trusted for https instead of the bundled
    /// web roots.
    pub ca_file: Option<PathBuf>,
}

/// Largest body remainder read (without waiting) to keep a connection.
const MAX_DRAIN: usize = 64 * 1024;

/// A client for one base URL, with its pool of kept-alive connections.
pub struct Client {
    target: Target,
    /// `Host` header value.
    authority: String,
    /// The URL's path without its trailing `/`.
    base_path: String,
    opts: Options,
    idle: Mutex<Vec<Conn>>,
}

impl Client {
    /// Checks `url` (http or https) and, for https, loads the trusted roots.
    pub fn new(url: &str, opts: Options) -> Result<Client, SetupError> {
        let parsed = url::Url::parse(url).map_err(|e| SetupError::Url(format!("{url:?}: {e}")))?;
        let host = parsed
            .host_str()
            .ok_or_else(|| SetupError::Url(format!("{url:?} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tls = match parsed.scheme() {
            "http" => None,
            "https" => {
                let config = tls_config(opts.ca_file.as_deref())?;
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| SetupError::Url(format!("host {host:?}: {e}")))?;
                Some((config, name))
            }
            s => return Err(SetupError::Url(format!("scheme {s:?}: use http or https"))),
        };
        let authority = match parsed.port() {
            Some(p) => format!("{}:{p}", parsed.host_str().unwrap_or_default()),
            None => parsed.host_str().unwrap_or_default().to_string(),
        };
        Ok(Client {
            target: Target {
                port: parsed.port_or_known_default().unwrap_or(80),
                host,
                tls,
            },
            authority,
            base_path: parsed.path().trim_end_matches('/').to_string(),
            opts,
            idle: Mutex::new(Vec::new()),
        })
    }

    pub fn host(&self) -> &str {
        &self.target.host
    }

    pub fn port(&self) -> u16 {
        self.target.port
    }

    /// The `Host` header value.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The base URL's path, without a trailing `/` (`/v1`, or empty).
    pub fn base_path(&self) -> &str {
        &self.base_path
    }

    pub fn read_timeout(&self) -> Duration {
        self.opts.read_timeout
    }

    /// Sends `POST path` with `headers` (after `Host`, before
    /// `Content-Length`) and `body`, and reads the response head: on a
    /// kept-alive connection if one is idle, sent again once on a fresh
    /// connection only if the reused one turns out to be closed before any
    /// byte of an answer (a timeout means the upstream has the request).
    pub fn post<'a>(
        &'a self,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        watch: &'a dyn Interrupt,
    ) -> Result<Response<'a>, Error> {
        self.request("POST", path, headers, body, watch)
    }

    /// `GET path`, like [`Client::post`] without a body.
    pub fn get<'a>(
        &'a self,
        path: &str,
        headers: &[(&str, &str)],
        watch: &'a dyn Interrupt,
    ) -> Result<Response<'a>, Error> {
        self.request("GET", path, headers, &[], watch)
    }

    fn request<'a>(
        &'a self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        watch: &'a dyn Interrupt,
    ) -> Result<Response<'a>, Error> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.authority);
        for (name, value) in headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let mut reused = self.checkout();
        loop {
            let fresh = reused.is_none();
            let mut conn = match reused.take() {
                Some(c) => c,
                None => conn::connect(&self.target, self.opts.connect_timeout, watch)?,
            };
            watch.set_socket(conn.tcp.try_clone().ok());
            if watch.is_cancelled() {
                return Err(Error::Cancelled);
            }
            let _ = conn.tcp.set_read_timeout(Some(self.opts.read_timeout));
            let _ = conn.tcp.set_write_timeout(Some(self.opts.read_timeout));
            let result = conn
                .wire
                .send(head.as_bytes(), body)
                .and_then(|()| conn.wire.read_head());
            match result {
                Ok(head) => {
                    return Ok(Response {
                        client: self,
                        conn,
                        head,
                        watch,
                    })
                }
                Err(_) if watch.is_cancelled() => return Err(Error::Cancelled),
                Err(e) if !fresh && conn.wire.received == 0 && e.is_dead_connection() => {
                    log::debug!("reused upstream connection failed ({e}); reconnecting");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// An idle connection ready for a request. One whose previous body was
    /// still arriving when it was released is read on (without waiting);
    /// if the rest is not all here yet, it is closed.
    fn checkout(&self) -> Option<Conn> {
        loop {
            let mut conn = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
            if conn.wire.body_done()
                || (settle(&mut conn) == Settled::Ready && conn.tcp.set_nonblocking(false).is_ok())
            {
                return Some(conn);
            }
        }
    }

    fn checkin(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.opts.max_idle {
            idle.push(conn);
        }
    }
}

/// A response whose head has arrived; the body is read on demand.
pub struct Response<'a> {
    client: &'a Client,
    conn: Conn,
    head: Head,
    watch: &'a dyn Interrupt,
}

impl Response<'_> {
    pub fn status(&self) -> u16 {
        self.head.status
    }

    /// Appends the next decoded body bytes to `out`; `Ok(0)` at the end of
    /// the body.
    pub fn read_body(&mut self, out: &mut Vec<u8>) -> Result<usize, Error> {
        self.conn.wire.read_body(out).map_err(|e| {
            if self.watch.is_cancelled() {
                Error::Cancelled
            } else {
                e
            }
        })
    }

    /// Done with the response: the connection goes back to the keep-alive
    /// pool. The rest of the body is never waited for (that would delay
    /// the stream's end): what has arrived is read now, the rest by the
    /// next request that takes the connection. Dropping a `Response`
    /// closes its connection.
    pub fn release(self) {
        let Response {
            client,
            mut conn,
            head,
            watch,
        } = self;
        watch.set_socket(None);
        if !head.keep_alive || watch.is_cancelled() || conn.tcp.set_nonblocking(true).is_err() {
            return;
        }
        match settle(&mut conn) {
            Settled::Ready if conn.tcp.set_nonblocking(false).is_ok() => client.checkin(conn),
            // Kept non-blocking until `checkout` reads the rest.
            Settled::Arriving => client.checkin(conn),
            _ => {}
        }
    }
}

/// Where a released connection's body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    /// Read to its end: the connection can carry the next request.
    Ready,
    /// The rest has not all arrived yet.
    Arriving,
    /// Broken, too long, or followed by bytes nobody asked for.
    Unusable,
}

/// Reads what has arrived of the body's rest, on a non-blocking socket.
fn settle(conn: &mut Conn) -> Settled {
    match conn.wire.skip_body(MAX_DRAIN) {
        Ok(()) if conn.wire.buffered().is_empty() => Settled::Ready,
        // `WouldBlock` on the non-blocking socket.
        Err(Error::Timeout) => Settled::Arriving,
        _ => Settled::Unusable,
    }
}

/// The roots trusted for https: the bundled web roots, or the CA file's.
fn tls_config(ca_file: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, SetupError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            use rustls::pki_types::pem::PemObject;
            let bad = |e: &dyn fmt::Display| SetupError::CaFile(format!("{}: {e}", path.display()));
            let certs =
                rustls::pki_types::CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))?;
            for cert in certs {
                roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
            }
            if roots.is_empty() {
                return Err(bad(&"no certificate in it"));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SetupError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::mpsc;

    /// Never cancelled.
    struct Never;

    impl Interrupt for Never {
        fn is_cancelled(&self) -> bool {
            false
        }
        fn set_socket(&self, _sock: Option<TcpStream>) {}
    }

    /// Reads one request with a `Content-Length: 2` body (what `post` sends
    /// below); false at EOF.
    fn read_request(sock: &mut TcpStream) -> bool {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"{}") {
            match sock.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        true
    }

    fn read_all(resp: &mut Response<'_>) -> Vec<u8> {
        let mut body = Vec::new();
        while resp.read_body(&mut body).unwrap() > 0 {}
        body
    }

    #[test]
    fn a_body_still_arriving_at_release_is_finished_by_the_next_request() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (go, go_rx) = mpsc::channel();
        let (sent, sent_rx) = mpsc::channel();
        let server = std::thread::spawn(move || {
            let (mut sock, _) = listener.accept().unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert!(read_request(&mut sock));
            sock.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                .unwrap();
            go_rx.recv().unwrap();
            // On loopback the bytes are in the client's queue when this returns.
            sock.write_all(b"0\r\n\r\n").unwrap();
            sent.send(()).unwrap();
            // The next request comes on the same connection.
            assert!(read_request(&mut sock), "the connection was not reused");
            sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .unwrap();
        });
        let client = Client::new(
            &format!("http://{addr}/v1"),
            Options {
                connect_timeout: Duration::from_secs(5),
                read_timeout: Duration::from_secs(5),
                max_idle: 2,
                ca_file: None,
            },
        )
        .unwrap();
        let mut resp = client.post("/v1/x", &[], b"{}", &Never).unwrap();
        let mut body = Vec::new();
        while body != b"hello" {
            assert!(resp.read_body(&mut body).unwrap() > 0);
        }
        // The answer is complete for the caller; the body's end is not here.
        resp.release();
        assert_eq!(client.idle.lock().unwrap().len(), 1);
        go.send(()).unwrap();
        sent_rx.recv().unwrap();
        let mut resp = client.post("/v1/x", &[], b"{}", &Never).unwrap();
        assert_eq!(read_all(&mut resp), b"ok");
        server.join().unwrap();
    }
}
