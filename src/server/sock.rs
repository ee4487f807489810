//! The socket calls of the loops besides reads: the listening socket (with
//! its backlog), the options set on every connection, and the write.

use std::io;
use std::net::SocketAddr;

use mio::net::TcpStream;

/// Listen backlog; the kernel caps it at `somaxconn`.
const BACKLOG: i32 = 8192;

/// Unsent bytes the kernel may hold for a client before the socket stops
/// being writable. Without it the send buffer auto-tunes to megabytes: a
/// slow client's backlog would sit in the kernel instead of holding back
/// its producer, and a client reading steadily could go seconds without a
/// writable edge and be taken for a slow consumer.
const NOTSENT_LOWAT: libc::c_int = 32 * 1024;

pub(super) fn set_notsent_lowat(sock: &TcpStream) {
    use std::os::fd::AsRawFd;
    let v = NOTSENT_LOWAT;
    // SAFETY: a valid fd and a pointer to a c_int of the size we pass.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        log::debug!("TCP_NOTSENT_LOWAT: {}", io::Error::last_os_error());
    }
}

/// A non-blocking listener with an explicit backlog, so bursts of
/// thousands of connects are not dropped.
pub(super) fn listen(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Writes `buf` to `sock` (`send` with `MSG_NOSIGNAL`, as std's write
/// does), as one raw system call: libc's `send` wraps every call in
/// pthread cancellation bookkeeping, which this process never uses and
/// which cost more user-space instructions than the rest of a paced
/// token's write.
pub(super) fn send(sock: &TcpStream, buf: &[u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid fd, and a pointer and length of a live slice; the
    // kernel only reads from it.
    let n = unsafe {
        // Every argument register-wide: the call is variadic.
        libc::syscall(
            libc::SYS_sendto,
            libc::c_long::from(sock.as_raw_fd()),
            buf.as_ptr(),
            buf.len(),
            libc::c_long::from(libc::MSG_NOSIGNAL),
            std::ptr::null::<libc::sockaddr>(),
            0 as libc::c_long,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
