//! The per-connection output buffer, and the per-loop pool its allocations
//! come from.
//!
//! Most of the time a stream has nothing waiting to be written, so an idle
//! connection holds no buffer at all: the allocation is taken from the
//! [`BufPool`] when a frame is appended and handed back as soon as the socket
//! has taken every byte. Frames that exist at the same moment are appended
//! into one HTTP chunk, so they leave in one `write`.

/// Allocations kept for reuse by one event loop.
#[derive(Debug)]
pub struct BufPool {
    free: Vec<Vec<u8>>,
    keep: usize,
    initial: usize,
    max_capacity: usize,
}

impl BufPool {
    /// Keeps up to `keep` buffers of `initial` bytes; grown buffers larger
    /// than `max_capacity` are freed instead of kept.
    pub fn new(keep: usize, initial: usize, max_capacity: usize) -> BufPool {
        BufPool {
            free: Vec::new(),
            keep,
            initial,
            max_capacity,
        }
    }

    pub fn take(&mut self) -> Vec<u8> {
        self.free
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.initial))
    }

    pub fn give(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > self.max_capacity || self.free.len() >= self.keep
        {
            return;
        }
        buf.clear();
        self.free.push(buf);
    }

    pub fn pooled(&self) -> usize {
        self.free.len()
    }
}

impl Default for BufPool {
    /// At most 256 buffers of at most 32 KiB (8 MiB) stay pooled after a
    /// burst; larger ones (a big `/metrics` answer, a backlog of pipelined
    /// answers) are freed.
    fn default() -> BufPool {
        BufPool::new(256, 4096, 32 * 1024)
    }
}

/// Bytes waiting for the socket.
#[derive(Debug, Default)]
pub struct OutBuf {
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    pos: usize,
    appended: u64,
    written: u64,
}

/// Room for the longest chunk-size line we write: 16 hex digits and CRLF.
const CHUNK_HEAD_ROOM: usize = 18;

impl OutBuf {
    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Total bytes ever appended; a mark to compare with [`OutBuf::written_total`].
    pub fn appended_total(&self) -> u64 {
        self.appended
    }

    pub fn written_total(&self) -> u64 {
        self.written
    }

    /// Whether this connection holds an allocation.
    pub fn holds_allocation(&self) -> bool {
        self.buf.capacity() != 0
    }

    fn ensure(&mut self, pool: &mut BufPool) {
        if self.buf.capacity() == 0 {
            self.buf = pool.take();
        } else if self.pos > 0 && self.pos * 2 >= self.buf.len() {
            // Compact before growing: most of the buffer was already written.
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    /// Appends raw bytes written by `f`.
    pub fn append(&mut self, pool: &mut BufPool, f: impl FnOnce(&mut Vec<u8>)) {
        self.ensure(pool);
        let before = self.buf.len();
        f(&mut self.buf);
        self.appended += (self.buf.len() - before) as u64;
        self.release_if_empty(pool);
    }

    /// Appends what `f` writes as one HTTP/1.1 chunk (`chunked`) or as is
    /// (a close-delimited HTTP/1.0 body). Writing nothing appends nothing:
    /// a zero-size chunk would end the body.
    pub fn append_chunk(
        &mut self,
        pool: &mut BufPool,
        chunked: bool,
        f: impl FnOnce(&mut Vec<u8>),
    ) {
        if !chunked {
            return self.append(pool, f);
        }
        self.ensure(pool);
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; CHUNK_HEAD_ROOM]);
        f(&mut self.buf);
        let room_end = start + CHUNK_HEAD_ROOM;
        let end = self.buf.len();
        let body = end - room_end;
        if body == 0 {
            self.buf.truncate(start);
            self.release_if_empty(pool);
            return;
        }
        // The size line, written backwards so it ends where the body starts.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let room = &mut self.buf[start..room_end];
        room[CHUNK_HEAD_ROOM - 2] = b'\r';
        room[CHUNK_HEAD_ROOM - 1] = b'\n';
        let mut at = CHUNK_HEAD_ROOM - 2;
        let mut m = body;
        loop {
            at -= 1;
            room[at] = HEX[m & 0xf];
            m >>= 4;
            if m == 0 {
                break;
            }
        }
        let at = start + at;
        if start == self.pos {
            // Nothing else waits (a paced stream's usual case): the bytes
            // of the room before the size line count as written already.
            self.pos = at;
            self.buf.extend_from_slice(b"\r\n");
            self.appended += (self.buf.len() - at) as u64;
            return;
        }
        // Slide the size line and the body down over the unused room: one
        // memmove of a few hundred bytes instead of a second buffer.
        self.buf.copy_within(at..end, start);
        self.buf.truncate(start + (end - at));
        self.buf.extend_from_slice(b"\r\n");
        self.appended += (self.buf.len() - start) as u64;
    }

    /// The last chunk of a chunked body.
    pub fn append_last_chunk(&mut self, pool: &mut BufPool) {
        self.append(pool, |b| b.extend_from_slice(b"0\r\n\r\n"));
    }

    /// The socket took `n` bytes.
    pub fn consume(&mut self, n: usize, pool: &mut BufPool) {
        let n = n.min(self.len());
        self.pos += n;
        self.written += n as u64;
        self.release_if_empty(pool);
    }

    /// Drops whatever is waiting and hands the allocation back.
    pub fn clear(&mut self, pool: &mut BufPool) {
        self.written += self.len() as u64;
        self.pos = self.buf.len();
        self.release_if_empty(pool);
    }

    fn release_if_empty(&mut self, pool: &mut BufPool) {
        if self.pos == self.buf.len() && self.buf.capacity() != 0 {
            pool.give(std::mem::take(&mut self.buf));
            self.pos = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_wrap_what_was_written() {
        let mut pool = BufPool::default();
        let mut out = OutBuf::default();
        out.append_chunk(&mut pool, true, |b| b.extend_from_slice(b"hello"));
        out.append_chunk(&mut pool, true, |b| b.extend_from_slice(&[b'x'; 300]));
        out.append_chunk(&mut pool, true, |_| {});
        out.append_last_chunk(&mut pool);
        let mut want = b"5\r\nhello\r\n12c\r\n".to_vec();
        want.extend_from_slice(&[b'x'; 300]);
        want.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(out.pending(), &want[..]);
        assert_eq!(out.appended_total(), want.len() as u64);
    }

    #[test]
    fn a_chunk_into_an_empty_buffer_is_framed_in_place() {
        let mut pool = BufPool::default();
        let mut out = OutBuf::default();
        out.append_chunk(&mut pool, true, |b| b.extend_from_slice(b"hello"));
        assert_eq!(out.pending(), b"5\r\nhello\r\n");
        out.consume(4, &mut pool);
        out.append_chunk(&mut pool, true, |b| b.extend_from_slice(b"ab"));
        assert_eq!(out.pending(), b"ello\r\n2\r\nab\r\n");
        out.consume(11, &mut pool);
        assert_eq!(out.pending(), b"\r\n");
        out.consume(2, &mut pool);
        assert!(!out.holds_allocation());
        out.append_chunk(&mut pool, true, |b| b.extend_from_slice(&[b'x'; 16]));
        assert_eq!(&out.pending()[..4], b"10\r\n");
        assert_eq!(out.pending().len(), 22);
        assert_eq!(out.appended_total(), 10 + 7 + 22);
        assert_eq!(out.written_total(), 17);
    }

    #[test]
    fn close_delimited_is_raw() {
        let mut pool = BufPool::default();
        let mut out = OutBuf::default();
        out.append_chunk(&mut pool, false, |b| b.extend_from_slice(b"data"));
        assert_eq!(out.pending(), b"data");
    }

    #[test]
    fn allocation_returns_to_the_pool_when_drained() {
        let mut pool = BufPool::default();
        let mut out = OutBuf::default();
        assert!(!out.holds_allocation());
        out.append(&mut pool, |b| b.extend_from_slice(b"abcdef"));
        assert!(out.holds_allocation());
        out.consume(2, &mut pool);
        assert_eq!(out.pending(), b"cdef");
        out.append(&mut pool, |b| b.extend_from_slice(b"gh"));
        assert_eq!(out.pending(), b"cdefgh");
        out.consume(6, &mut pool);
        assert!(out.is_empty());
        assert!(!out.holds_allocation());
        assert_eq!(pool.pooled(), 1);
        assert_eq!(out.written_total(), 8);
        // The next append reuses the pooled allocation.
        out.append(&mut pool, |b| b.push(b'z'));
        assert_eq!(pool.pooled(), 0);
    }

    #[test]
    fn chunk_size_lines() {
        // Into an empty buffer (framed in place) and behind waiting bytes
        // (slid down), every size-line length.
        for n in [1usize, 15, 16, 255, 256, 4095, 4096, 65535, 0x10000] {
            for behind in [false, true] {
                let mut pool = BufPool::default();
                let mut out = OutBuf::default();
                if behind {
                    out.append(&mut pool, |b| b.extend_from_slice(b"head"));
                }
                out.append_chunk(&mut pool, true, |b| b.resize(b.len() + n, b'x'));
                let mut want = if behind { b"head".to_vec() } else { Vec::new() };
                want.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                want.resize(want.len() + n, b'x');
                want.extend_from_slice(b"\r\n");
                assert_eq!(out.pending(), &want[..], "{n} behind {behind}");
                assert_eq!(out.appended_total(), want.len() as u64);
            }
        }
    }
}
