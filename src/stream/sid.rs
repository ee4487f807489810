//! Stream ids: 128 bits from the kernel's random source, base64url without
//! padding (22 characters), the first naming the event loop that owns the
//! stream when there are several (`--threads`). Nobody can guess one, so an
//! id is a handle for resume and stop by id.

/// The characters of a stream id, base64url's.
const SID_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The most event loops a stream id can name ([`sid_for_loop`]).
pub const MAX_LOOPS: usize = 64;

/// A stream id for a stream of event loop `index` (`< MAX_LOOPS`): a
/// [`random_sid`] whose first character names the loop, so that a resume
/// or a stop by id arriving on another loop finds its owner
/// ([`loop_of_sid`]); 122 random bits remain.
pub fn sid_for_loop(index: usize) -> Box<str> {
    let mut sid = random_sid_bytes();
    sid[0] = SID_ALPHABET[index % MAX_LOOPS];
    sid_str(&sid)
}

/// 22 characters of the alphabet as a string (one allocation).
fn sid_str(sid: &[u8; 22]) -> Box<str> {
    // Only characters of the alphabet: always UTF-8.
    std::str::from_utf8(sid).unwrap_or_default().into()
}

/// The event loop a stream id names (its first character), if any.
pub fn loop_of_sid(sid: &str) -> Option<usize> {
    let first = *sid.as_bytes().first()?;
    SID_ALPHABET.iter().position(|&c| c == first)
}

/// A stream id clients cannot guess: 128 random bits from the kernel,
/// base64url without padding (22 characters of `[A-Za-z0-9_-]`). The bits
/// are read 4 KiB at a time per thread: one `getrandom` call serves 256
/// ids.
pub fn random_sid() -> Box<str> {
    sid_str(&random_sid_bytes())
}

fn random_sid_bytes() -> [u8; 22] {
    const ALPHABET: &[u8; 64] = SID_ALPHABET;
    thread_local! {
        static POOL: std::cell::RefCell<([u8; 4096], usize)> =
            const { std::cell::RefCell::new(([0; 4096], 4096)) };
    }
    let v = POOL.with(|p| {
        let mut p = p.borrow_mut();
        let (buf, used) = &mut *p;
        if *used + 16 > buf.len() {
            fill_random(buf);
            *used = 0;
        }
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&buf[*used..*used + 16]);
        // Handed out once: wipe it.
        buf[*used..*used + 16].fill(0);
        *used += 16;
        u128::from_le_bytes(bytes)
    });
    std::array::from_fn(|i| ALPHABET[((v >> (6 * i)) & 63) as usize])
}

/// Fills `buf` from the kernel's random source.
fn fill_random(buf: &mut [u8]) {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: writes at most the remaining length into our buffer.
        let n = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), buf.len() - got, 0) };
        if n > 0 {
            got += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // No kernel randomness is a broken machine: better no server
            // than guessable ids.
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
}
