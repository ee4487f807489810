//! A client connection's bytes: a non-blocking TCP socket (bound to a
//! chosen source address when asked, TCP_NODELAY) with optional TLS
//! (rustls, web PKI roots plus `--cacert`). `read`/`write` behave like a
//! non-blocking socket whatever the layer: `WouldBlock` means wait for the
//! next readiness event.

use mio::net::TcpStream;
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

/// Starts a non-blocking connect, from `source` (port chosen by the kernel) when given.
pub fn connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let domain = socket2::Domain::for_address(addr);
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    sock.set_nodelay(true)?;
    if let Some(ip) = source {
        // Lets many sources share ports' 4-tuples; the kernel picks the port at connect.
        let _ = sock.set_reuse_address(true);
        sock.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(sock.into()))
}

/// TLS settings shared by every connection.
pub fn tls_config(cacert: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = cacert {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("--cacert {}: {e}", path.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("--cacert {}: {e}", path.display()))?;
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("--cacert {}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

pub enum Transport {
    Plain(TcpStream),
    Tls(TcpStream, Box<rustls::ClientConnection>),
}

impl Transport {
    pub fn new(
        sock: TcpStream,
        tls: Option<(&Arc<rustls::ClientConfig>, &str)>,
    ) -> io::Result<Self> {
        Ok(match tls {
            None => Transport::Plain(sock),
            Some((cfg, host)) => {
                let name = ServerName::try_from(host.to_string())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let conn =
                    rustls::ClientConnection::new(cfg.clone(), name).map_err(io::Error::other)?;
                Transport::Tls(sock, Box::new(conn))
            }
        })
    }

    pub fn socket(&mut self) -> &mut TcpStream {
        match self {
            Transport::Plain(s) | Transport::Tls(s, _) => s,
        }
    }

    /// Connect finished? `Ok(true)` connected, `Ok(false)` still in progress.
    pub fn connected(&mut self) -> io::Result<bool> {
        let s = self.socket();
        if let Some(e) = s.take_error()? {
            return Err(e);
        }
        match s.peer_addr() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Writes what TLS has queued; `Ok(true)` when nothing is left.
    pub fn flush_tls(&mut self) -> io::Result<bool> {
        if let Transport::Tls(s, c) = self {
            while c.wants_write() {
                match c.write_tls(s) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(true)
    }

    /// Writes from `buf`; returns bytes taken. With TLS, bytes are taken
    /// into the session and flushed as far as the socket allows.
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.write(buf),
            Transport::Tls(_, c) => {
                let n = c.writer().write(buf)?;
                self.flush_tls()?;
                Ok(n)
            }
        }
    }

    /// All written bytes have left for the socket.
    pub fn write_done(&self) -> bool {
        match self {
            Transport::Plain(_) => true,
            // Plaintext waits in rustls until the handshake is over.
            Transport::Tls(_, c) => !c.is_handshaking() && !c.wants_write(),
        }
    }

    /// Reads into `buf`: `Ok(0)` is the end of the stream.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            Transport::Tls(s, c) => loop {
                match c.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                match c.read_tls(s) {
                    Ok(0) => return Ok(0),
                    Ok(_) => {
                        c.process_new_packets()
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        // Handshake replies and alerts go out at once.
                        while c.wants_write() {
                            match c.write_tls(s) {
                                Ok(_) => {}
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                                Err(e) => return Err(e),
                            }
                        }
                    }
                    Err(e) => return Err(e),
                }
            },
        }
    }
}
