//! One upstream connection: connecting (cancellable, TLS handshake
//! included), the transport (plain or rustls), and [`Wire`], the buffered
//! reader of one response at a time: its head, then its body de-framed
//! (`Content-Length`, chunked through [`crate::http::chunked`] in its
//! CRLF-only mode, or delimited by the close).
//!
//! `Wire` is generic over the byte stream so that tests feed it scripted
//! reads, split anywhere, without a socket.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::head::{self, Framing, Head, Parsed};
use super::{Error, Interrupt};
use crate::http::chunked::{ChunkedDecoder, LineEnds};

/// Largest response head accepted (interim heads count separately).
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// Interim (1xx) responses skipped before the final one.
const MAX_INTERIM: usize = 8;
/// Read buffer size; it grows only while a large head is read.
const BUF: usize = 16 * 1024;

/// Where to connect, and how.
pub(super) struct Target {
    pub host: String,
    pub port: u16,
    pub tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
}

pub(super) enum Transport {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf),
            Transport::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Plain(s) => s.write(buf),
            Transport::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.flush(),
            Transport::Tls(s) => s.flush(),
        }
    }
}

/// An open connection.
pub(super) struct Conn {
    /// The raw socket, for timeouts and for a cancel to shut it down.
    pub tcp: TcpStream,
    pub wire: Wire<Transport>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Clones of the socket may live on (registered for cancel): make
        // sure the upstream sees the close now.
        let _ = self.tcp.shutdown(Shutdown::Both);
    }
}

/// Resolves and connects to `target`, trying each address, and completes
/// the TLS handshake, all within `timeout` per address; gives up within
/// ~20 ms of a cancel. The socket is registered with `watch` as soon as it
/// exists, so a cancel during the handshake interrupts it too.
pub(super) fn connect(
    target: &Target,
    timeout: Duration,
    watch: &dyn Interrupt,
) -> Result<Conn, Error> {
    let addrs: Vec<SocketAddr> = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(|e| Error::Connect(format!("cannot resolve {}: {e}", target.host)))?
        .collect();
    let mut last = None;
    for addr in addrs {
        if watch.is_cancelled() {
            return Err(Error::Cancelled);
        }
        let deadline = Instant::now() + timeout;
        match connect_cancellable(addr, deadline, watch) {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                watch.set_socket(tcp.try_clone().ok());
                let transport = match &target.tls {
                    None => Transport::Plain(tcp.try_clone().map_err(Error::Io)?),
                    Some((config, name)) => {
                        let tls = handshake(&tcp, config, name, deadline).map_err(|e| {
                            if watch.is_cancelled() {
                                Error::Cancelled
                            } else {
                                Error::Connect(format!("TLS handshake with {addr}: {e}"))
                            }
                        })?;
                        let sock = tcp.try_clone().map_err(Error::Io)?;
                        Transport::Tls(Box::new(rustls::StreamOwned::new(tls, sock)))
                    }
                };
                return Ok(Conn {
                    tcp,
                    wire: Wire::new(transport),
                });
            }
            Err(_) if watch.is_cancelled() => return Err(Error::Cancelled),
            Err(e) => last = Some((addr, e)),
        }
    }
    Err(match last {
        Some((addr, e)) => Error::Connect(format!("cannot connect to {addr}: {e}")),
        None => Error::Connect(format!("{} resolves to no address", target.host)),
    })
}

fn handshake(
    tcp: &TcpStream,
    config: &Arc<rustls::ClientConfig>,
    name: &rustls::pki_types::ServerName<'static>,
    deadline: Instant,
) -> io::Result<rustls::ClientConnection> {
    let mut tls = rustls::ClientConnection::new(config.clone(), name.clone())
        .map_err(|e| io::Error::other(e.to_string()))?;
    let mut sock = tcp;
    while tls.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        }
        sock.set_read_timeout(Some(left))?;
        sock.set_write_timeout(Some(left))?;
        tls.complete_io(&mut sock)?;
    }
    Ok(tls)
}

/// Connects like `TcpStream::connect_timeout`, but gives up within ~20 ms
/// of a cancel: a client that leaves while the upstream is slow to accept
/// does not hold a worker for the whole connect timeout.
fn connect_cancellable(
    addr: SocketAddr,
    deadline: Instant,
    watch: &dyn Interrupt,
) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    use std::os::fd::AsRawFd;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => loop {
            if watch.is_cancelled() {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
            }
            let mut pfd = libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            let wait = left.min(Duration::from_millis(20)).as_millis() as libc::c_int;
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, wait.max(1)) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n > 0 {
                if let Some(e) = socket.take_error()? {
                    return Err(e);
                }
                break;
            }
        },
        Err(e) => return Err(e),
    }
    socket.set_nonblocking(false)?;
    Ok(socket.into())
}

/// Where the current response's body stands.
#[derive(Debug, Clone)]
enum Body {
    /// No response head read yet.
    Head,
    /// This many bytes left.
    Length(u64),
    Chunked(ChunkedDecoder),
    /// Until the upstream closes.
    Close,
    /// The body ended.
    Done,
    /// The framing broke after data that was handed out; the next read
    /// says why.
    Failed(&'static str),
}

/// A buffered reader/writer of one response at a time over `T`.
pub(super) struct Wire<T> {
    t: T,
    /// `buf[start..end]` holds bytes received and not yet consumed; the
    /// allocation is zeroed once and reused for every read.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes received since [`Wire::begin`] (0: nothing came back).
    pub received: usize,
    body: Body,
}

impl<T: Read + Write> Wire<T> {
    pub fn new(t: T) -> Wire<T> {
        Wire {
            t,
            buf: vec![0; BUF],
            start: 0,
            end: 0,
            received: 0,
            body: Body::Head,
        }
    }

    /// Starts a new exchange: sends the request's bytes.
    pub fn send(&mut self, head: &[u8], body: &[u8]) -> Result<(), Error> {
        self.received = 0;
        self.body = Body::Head;
        self.t.write_all(head).map_err(Error::from_io)?;
        self.t.write_all(body).map_err(Error::from_io)?;
        self.t.flush().map_err(Error::from_io)
    }

    /// Bytes received and not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Reads more bytes into the buffer; 0 at EOF.
    fn fill(&mut self) -> Result<usize, Error> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.buf.len() - self.end < BUF / 4 && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        if self.end == self.buf.len() {
            // Only a head gets here (chunk lines and trailers are far
            // smaller than the buffer); it is bounded by `MAX_HEAD`.
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = loop {
            match self.t.read(&mut self.buf[self.end..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r.map_err(Error::from_io)?,
            }
        };
        self.end += n;
        self.received += n;
        Ok(n)
    }

    /// Reads up to the final response head (skipping interim ones).
    pub fn read_head(&mut self) -> Result<Head, Error> {
        let mut interim = 0;
        loop {
            match head::parse(self.buffered()).map_err(|e| Error::Protocol(e.reason()))? {
                Some(Parsed::Interim(n)) => {
                    self.start += n;
                    interim += 1;
                    if interim > MAX_INTERIM {
                        return Err(Error::Protocol("too many interim responses"));
                    }
                    continue;
                }
                Some(Parsed::Final(head, n)) => {
                    self.start += n;
                    self.body = match head.framing {
                        Framing::Length(0) => Body::Done,
                        Framing::Length(n) => Body::Length(n),
                        Framing::Chunked => {
                            Body::Chunked(ChunkedDecoder::new(LineEnds::CrLf, u64::MAX))
                        }
                        Framing::Close => Body::Close,
                    };
                    return Ok(head);
                }
                None if self.buffered().len() > MAX_HEAD => {
                    return Err(Error::Protocol("response head too large"))
                }
                None => {}
            }
            if self.fill()? == 0 {
                return Err(Error::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection before answering",
                )));
            }
        }
    }

    /// Appends the next decoded body bytes to `out`; 0 at the body's end.
    pub fn read_body(&mut self, out: &mut Vec<u8>) -> Result<usize, Error> {
        loop {
            let buffered = self.end - self.start;
            match &mut self.body {
                Body::Head | Body::Done => return Ok(0),
                Body::Length(left) if buffered > 0 => {
                    let n = buffered.min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= n as u64;
                    if *left == 0 {
                        self.body = Body::Done;
                    }
                    out.extend_from_slice(&self.buf[self.start..self.start + n]);
                    self.start += n;
                    return Ok(n);
                }
                Body::Close if buffered > 0 => {
                    out.extend_from_slice(&self.buf[self.start..self.end]);
                    self.start = self.end;
                    return Ok(buffered);
                }
                Body::Failed(reason) => return Err(Error::Protocol(reason)),
                Body::Chunked(decoder) => {
                    let before = out.len();
                    let decoded = match decoder.decode(&self.buf[self.start..self.end], out) {
                        Ok(decoded) => decoded,
                        // Hand out the chunks before the bad one first, as
                        // if they had come in a read of their own.
                        Err(e) if out.len() > before => {
                            self.body = Body::Failed(e.reason());
                            return Ok(out.len() - before);
                        }
                        Err(e) => return Err(Error::Protocol(e.reason())),
                    };
                    self.start += decoded.consumed;
                    if decoded.done {
                        self.body = Body::Done;
                    }
                    if out.len() > before || decoded.done {
                        return Ok(out.len() - before);
                    }
                }
                Body::Length(_) | Body::Close => {}
            }
            // Nothing usable buffered: read more.
            if self.fill()? == 0 {
                if matches!(self.body, Body::Close) {
                    self.body = Body::Done;
                    return Ok(0);
                }
                return Err(eof());
            }
        }
    }

    /// Whether the current response's body has been read to its end.
    pub fn body_done(&self) -> bool {
        matches!(self.body, Body::Done)
    }

    /// Reads the rest of the body, discarding it; refuses more than `limit`
    /// bytes of it.
    pub fn skip_body(&mut self, limit: usize) -> Result<(), Error> {
        let mut scratch = Vec::new();
        let mut total = 0;
        while !self.body_done() {
            scratch.clear();
            total += self.read_body(&mut scratch)?;
            if total > limit {
                return Err(Error::Protocol(
                    "unexpected data after the end of the stream",
                ));
            }
        }
        Ok(())
    }
}

fn eof() -> Error {
    Error::Io(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the upstream closed the connection mid-stream",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte stream that hands out the given pieces, one per read, then EOF.
    struct Script {
        pieces: std::collections::VecDeque<Vec<u8>>,
        written: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some(mut p) = self.pieces.pop_front() else {
                return Ok(0);
            };
            let n = p.len().min(buf.len());
            buf[..n].copy_from_slice(&p[..n]);
            if n < p.len() {
                self.pieces.push_front(p.split_off(n));
            }
            Ok(n)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn wire(pieces: &[&[u8]]) -> Wire<Script> {
        let mut w = Wire::new(Script {
            pieces: pieces.iter().map(|p| p.to_vec()).collect(),
            written: Vec::new(),
        });
        w.send(b"REQ", b"").unwrap();
        w
    }

    /// Status and body, or the error's text.
    fn read_all(pieces: &[&[u8]]) -> Result<(u16, Vec<u8>), String> {
        let mut w = wire(pieces);
        let head = w.read_head().map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        while w.read_body(&mut body).map_err(|e| e.to_string())? > 0 {}
        assert!(w.body_done());
        Ok((head.status, body))
    }

    /// Status and body, or the error's text.
    type Expected = Result<(u16, &'static [u8]), &'static str>;

    #[test]
    fn bodies_in_every_framing_split_anywhere() {
        let cases: &[(&[u8], Expected)] = &[
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n",
                Ok((200, b"hello world")),
            ),
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                Ok((200, b"hello")),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcEXTRA",
                Ok((200, b"abc")),
            ),
            (
                b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end",
                Ok((200, b"until the end")),
            ),
            (b"HTTP/1.1 204 No Content\r\n\r\n", Ok((204, b""))),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
                Err("bad response: chunked framing line not ended by CRLF"),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n",
                Err("bad response: chunk data not followed by CRLF"),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
                Err("the upstream closed the connection mid-stream"),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel",
                Err("the upstream closed the connection mid-stream"),
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Err("bad response: a Transfer-Encoding other than one final chunked"),
            ),
            (
                b"HTTP/1.1 200 O",
                Err("the upstream closed the connection before answering"),
            ),
        ];
        for (input, expected) in cases {
            let expected = expected
                .map(|(s, b)| (s, b.to_vec()))
                .map_err(str::to_string);
            let show = String::from_utf8_lossy(input);
            assert_eq!(read_all(&[input]), expected, "{show:?}");
            for cut in 1..input.len() {
                let (a, b) = input.split_at(cut);
                assert_eq!(read_all(&[a, b]), expected, "{show:?} cut at {cut}");
            }
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(read_all(&bytes), expected, "{show:?} bytewise");
        }
    }

    #[test]
    fn a_body_ends_where_its_framing_says() {
        let mut w = wire(&[b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcEXTRA"]);
        w.read_head().unwrap();
        let mut body = Vec::new();
        while w.read_body(&mut body).unwrap() > 0 {}
        assert_eq!(
            (body.as_slice(), w.buffered()),
            (&b"abc"[..], &b"EXTRA"[..])
        );
    }

    #[test]
    fn chunks_before_a_framing_error_are_handed_out_first() {
        let mut w =
            wire(&[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n2\nno\r\n"]);
        w.read_head().unwrap();
        let mut body = Vec::new();
        assert_eq!(w.read_body(&mut body).unwrap(), 2);
        assert_eq!(body, b"ok");
        let e = w.read_body(&mut body).unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad response: chunked framing line not ended by CRLF"
        );
        assert_eq!(body, b"ok");
    }

    #[test]
    fn two_responses_on_one_connection() {
        let mut w = wire(&[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nc\r\n0\r\n\r\n"]);
        w.read_head().unwrap();
        w.skip_body(64).unwrap();
        w.send(b"REQ2", b"").unwrap();
        w.read_head().unwrap();
        let mut body = Vec::new();
        while w.read_body(&mut body).unwrap() > 0 {}
        assert_eq!(body, b"c");
        assert_eq!(w.t.written, b"REQREQ2");
    }

    #[test]
    fn heads_are_bounded() {
        let mut big = b"HTTP/1.1 200 OK\r\nX-Filler: ".to_vec();
        big.resize(MAX_HEAD + 1, b'x');
        assert_eq!(
            read_all(&[&big]),
            Err("bad response: response head too large".into())
        );
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(MAX_INTERIM + 1);
        assert_eq!(
            read_all(&[&interim]),
            Err("bad response: too many interim responses".into())
        );
    }

    #[test]
    fn skipping_a_body_is_bounded() {
        let mut w = wire(&[
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
            &[b'x'; 100],
        ]);
        w.read_head().unwrap();
        assert!(w.skip_body(10).is_err());
    }
}
