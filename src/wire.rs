//! Numbers and JSON strings written straight into an output buffer, without
//! `core::fmt`.
//!
//! Every response head, token frame and terminal event goes through these,
//! so they are kept to a few instructions for the common case: decimals
//! from a two-digit table, fixed-point numbers from integers, and a JSON
//! string copied whole when it holds nothing to escape. Each writes exactly
//! what the `core::fmt` / `serde_json` call it replaces would (the tests
//! compare them on every kind of input).

const DIGITS2: &[u8; 200] = b"0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// `n` in decimal (as `{n}` writes it).
pub fn push_u64(buf: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut at = tmp.len();
    while n >= 100 {
        let d = (n % 100) as usize * 2;
        n /= 100;
        at -= 2;
        tmp[at..at + 2].copy_from_slice(&DIGITS2[d..d + 2]);
    }
    if n >= 10 {
        let d = n as usize * 2;
        at -= 2;
        tmp[at..at + 2].copy_from_slice(&DIGITS2[d..d + 2]);
    } else {
        at -= 1;
        tmp[at] = b'0' + n as u8;
    }
    buf.extend_from_slice(&tmp[at..]);
}

/// `v` with `decimals` (at most 6) digits after the point, as
/// `format!("{v:.decimals$}")` writes it.
///
/// The usual case (a non-negative value below 2^32 once scaled, not within
/// a hair of a rounding tie) is rounded from the scaled value; anything
/// else — ties, where `core::fmt` rounds the exact binary value half to
/// even, huge values, NaN and the infinities — goes to `core::fmt`, so the
/// bytes are the same either way.
pub fn push_fixed(buf: &mut Vec<u8>, v: f64, decimals: u32) {
    debug_assert!(decimals <= 6);
    let scale = 10u64.pow(decimals);
    let scaled = v * scale as f64;
    // Below 2^32 the scaled value's rounding error is under 1e-6, far
    // from the 1e-4 kept around each tie.
    if v.is_sign_positive() && scaled < 4_294_967_296.0 {
        let floor = scaled.floor();
        let frac = scaled - floor;
        if (frac - 0.5).abs() > 1e-4 {
            let r = floor as u64 + u64::from(frac > 0.5);
            push_u64(buf, r / scale);
            if decimals > 0 {
                buf.push(b'.');
                let mut f = r % scale;
                let mut tmp = [b'0'; 6];
                for i in (0..decimals as usize).rev() {
                    tmp[i] = b'0' + (f % 10) as u8;
                    f /= 10;
                }
                buf.extend_from_slice(&tmp[..decimals as usize]);
            }
            return;
        }
    }
    use std::io::Write;
    let _ = write!(buf, "{v:.*}", decimals as usize);
}

/// Bytes that must be escaped in a JSON string (as serde_json escapes
/// them: control characters, `"` and `\`), as a table: one load a byte.
static ESCAPE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = true;
        i += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Whether byte `b` must be escaped in a JSON string.
#[inline]
pub fn needs_escape(b: u8) -> bool {
    ESCAPE[usize::from(b)]
}

/// Whether `s` can be copied into a JSON string as it is.
#[inline]
pub fn is_json_plain(s: &[u8]) -> bool {
    let mut bad = false;
    for &b in s {
        bad |= needs_escape(b);
    }
    !bad
}

/// The characters of `s`, escaped for the inside of a JSON string (no
/// quotes), exactly as `serde_json` escapes them.
#[inline]
pub fn push_json_inner(buf: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    if is_json_plain(bytes) {
        buf.extend_from_slice(bytes);
        return;
    }
    escape_slow(buf, bytes);
}

/// `head`, `body` and `tail` appended with one capacity check, `body`
/// copied without a call for the short texts tokens are.
#[inline]
pub fn push3(buf: &mut Vec<u8>, head: &[u8], body: &[u8], tail: &[u8]) {
    let n = head.len() + body.len() + tail.len();
    buf.reserve(n);
    let len = buf.len();
    // SAFETY: `reserve` made room for `n` more bytes after `len`; the three
    // copies fill exactly those bytes, from slices that cannot overlap the
    // spare capacity of `buf`.
    unsafe {
        let dst = buf.as_mut_ptr().add(len);
        std::ptr::copy_nonoverlapping(head.as_ptr(), dst, head.len());
        let at = dst.add(head.len());
        small_copy(body.as_ptr(), at, body.len());
        std::ptr::copy_nonoverlapping(tail.as_ptr(), at.add(body.len()), tail.len());
        buf.set_len(len + n);
    }
}

/// `copy_nonoverlapping` that does short copies with two overlapping
/// loads and stores instead of a call to `memcpy`.
///
/// # Safety
/// As `copy_nonoverlapping(src, dst, n)`.
#[inline]
unsafe fn small_copy(src: *const u8, dst: *mut u8, n: usize) {
    unsafe {
        if (8..=16).contains(&n) {
            let a = std::ptr::read_unaligned(src.cast::<u64>());
            let b = std::ptr::read_unaligned(src.add(n - 8).cast::<u64>());
            std::ptr::write_unaligned(dst.cast::<u64>(), a);
            std::ptr::write_unaligned(dst.add(n - 8).cast::<u64>(), b);
        } else if (4..8).contains(&n) {
            let a = std::ptr::read_unaligned(src.cast::<u32>());
            let b = std::ptr::read_unaligned(src.add(n - 4).cast::<u32>());
            std::ptr::write_unaligned(dst.cast::<u32>(), a);
            std::ptr::write_unaligned(dst.add(n - 4).cast::<u32>(), b);
        } else if n < 4 {
            for i in 0..n {
                *dst.add(i) = *src.add(i);
            }
        } else {
            std::ptr::copy_nonoverlapping(src, dst, n);
        }
    }
}

/// `s` as a JSON string, quotes included (as `serde_json::to_writer` writes it).
pub fn push_json_str(buf: &mut Vec<u8>, s: &str) {
    buf.reserve(s.len() + 2);
    buf.push(b'"');
    push_json_inner(buf, s);
    buf.push(b'"');
}

/// What an escaped byte becomes after its `\\`: the short escapes, `u`
/// for the `\\u00XX` form, 0 for a byte copied as it is.
static ESCAPE_AS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x0c] = b'f';
    t[b'\n' as usize] = b'n';
    t[b'\r' as usize] = b'r';
    t[b'\t' as usize] = b't';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// `bytes` escaped, whether or not they need it (callers that checked
/// [`is_json_plain`] already skip the second scan): one pass over the
/// bytes into room reserved for the worst case, written without a
/// capacity check per byte.
#[cold]
pub fn escape_slow(buf: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // At most six bytes out for one in.
    buf.reserve(bytes.len() * 6);
    let len = buf.len();
    let spare = &mut buf.spare_capacity_mut()[..bytes.len() * 6];
    let mut n = 0;
    for &b in bytes {
        let e = ESCAPE_AS[usize::from(b)];
        if e == 0 {
            spare[n].write(b);
            n += 1;
        } else if e != b'u' {
            spare[n].write(b'\\');
            spare[n + 1].write(e);
            n += 2;
        } else {
            for (k, c) in [
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]
            .into_iter()
            .enumerate()
            {
                spare[n + k].write(c);
            }
            n += 6;
        }
    }
    // SAFETY: the first `n` bytes of the spare capacity were written above.
    unsafe { buf.set_len(len + n) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fixed(v: f64, d: u32) -> String {
        let mut b = Vec::new();
        push_fixed(&mut b, v, d);
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn decimals() {
        for n in [
            0,
            1,
            9,
            10,
            99,
            100,
            101,
            999,
            1000,
            65_535,
            123_456_789,
            u64::MAX,
        ] {
            let mut b = Vec::new();
            push_u64(&mut b, n);
            assert_eq!(String::from_utf8(b).unwrap(), n.to_string());
        }
    }

    #[test]
    fn fixed_point() {
        let cases = [
            (0.0, 3, "0.000"),
            (0.1534, 3, "0.153"),
            (1.5, 3, "1.500"),
            (49.83, 1, "49.8"),
            (10.0, 1, "10.0"),
            (0.05, 1, "0.1"),
            (0.25, 1, "0.2"), // a tie: half to even, as core::fmt
            (0.35, 1, "0.3"), // 0.35 is a hair under in binary
            (1.0625, 3, "1.062"),
            (9.9999, 3, "10.000"),
            (5e9, 1, "5000000000.0"),
            (f64::INFINITY, 1, "inf"),
            (f64::NAN, 3, "NaN"),
            (-1.25, 1, "-1.2"),
        ];
        for (v, d, want) in cases {
            assert_eq!(fixed(v, d), want, "{v} with {d} decimals");
            assert_eq!(fixed(v, d), format!("{v:.*}", d as usize), "{v}");
        }
    }

    #[test]
    fn json_strings() {
        for s in [
            "",
            "Hello",
            " world",
            "a\"b",
            "back\\slash",
            "\n\r\t\u{8}\u{c}",
            "\u{0}\u{1}\u{1f}\u{7f}",
            "héllo ✓ 🎉",
            "</script>",
        ] {
            let mut b = Vec::new();
            push_json_str(&mut b, s);
            assert_eq!(b, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn three_parts_whatever_their_lengths() {
        let text: Vec<u8> = (0..40u8).map(|i| b'a' + i % 26).collect();
        for n in 0..text.len() {
            let mut b = b"x".to_vec();
            push3(&mut b, b"head", &text[..n], b"tail");
            let mut want = b"xhead".to_vec();
            want.extend_from_slice(&text[..n]);
            want.extend_from_slice(b"tail");
            assert_eq!(b, want, "{n}");
        }
    }

    proptest! {
        #[test]
        fn fixed_matches_core_fmt(v in any::<f64>(), d in 0u32..=6) {
            prop_assert_eq!(fixed(v, d), format!("{v:.*}", d as usize));
        }

        #[test]
        fn fixed_matches_core_fmt_for_durations(ns in 0u64..10_000_000_000_000, d in 0u32..=3) {
            let v = ns as f64 / 1e6;
            prop_assert_eq!(fixed(v, d), format!("{v:.*}", d as usize));
        }

        #[test]
        fn plain_means_nothing_to_escape(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            prop_assert_eq!(is_json_plain(&bytes), !bytes.iter().any(|&b| needs_escape(b)));
        }

        #[test]
        fn json_matches_serde_json(s in any::<String>()) {
            let mut b = Vec::new();
            push_json_str(&mut b, &s);
            prop_assert_eq!(b, serde_json::to_vec(&s).unwrap());
        }

        #[test]
        fn decimal_matches_core_fmt(n in any::<u64>()) {
            let mut b = Vec::new();
            push_u64(&mut b, n);
            prop_assert_eq!(String::from_utf8(b).unwrap(), n.to_string());
        }
    }
}
