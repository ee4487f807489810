//! API keys: who may start, resume or stop a stream.
//!
//! Keys come from `--api-key` (repeatable; principals `key-1`, `key-2`, …
//! in order) and `--api-key-file` (`name:key` per line, `#` comments; a
//! line without a name is named `line-N`). A request presents its key as
//! `Authorization: Bearer KEY` or `X-Api-Key: KEY`, or, on the GET stream
//! endpoints only, as `?access_token=KEY` (a browser's `EventSource` cannot
//! set headers). The check runs before any backend work and compares in
//! constant time against every key, so neither the key nor which key
//! matched shows in the timing. What a check yields is the *principal*
//! (a name), never the key: the key reaches no log line, metric label or
//! error message.

use std::path::Path;

/// The keys the server accepts, each with the principal it identifies.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    entries: Vec<Entry>,
}

/// A principal's name and its key.
type Entry = (Box<str>, Box<[u8]>);

/// What the router checks: the API keys, and the key `/metrics` needs.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    pub keys: std::sync::Arc<Keys>,
    pub metrics_key: Option<Keys>,
}

impl Auth {
    /// From the flags; the error names the flag.
    pub fn from_config(cfg: &crate::config::Config) -> Result<Auth, String> {
        let metrics_key = match &cfg.metrics_key {
            Some(k) => {
                let k = k.trim();
                check_key(k).map_err(|e| format!("--metrics-key: {e}"))?;
                Some(Keys {
                    entries: vec![("metrics".into(), k.as_bytes().into())],
                })
            }
            None => None,
        };
        Ok(Auth {
            keys: std::sync::Arc::new(Keys::load(&cfg.api_key, cfg.api_key_file.as_deref())?),
            metrics_key,
        })
    }
}

/// A key a request presented, and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented<'a> {
    None,
    Key(&'a str),
}

impl Keys {
    /// Keys from the command line and, when given, the key file.
    pub fn load(cli: &[String], file: Option<&Path>) -> Result<Keys, String> {
        let mut keys = Keys::default();
        for (i, k) in cli.iter().enumerate() {
            let k = k.trim();
            check_key(k).map_err(|e| format!("--api-key number {}: {e}", i + 1))?;
            keys.entries
                .push((format!("key-{}", i + 1).into(), k.as_bytes().into()));
        }
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--api-key-file {}: {e}", path.display()))?;
            keys.entries.extend(
                parse_file(&text).map_err(|e| format!("--api-key-file {}: {e}", path.display()))?,
            );
        }
        Ok(keys)
    }

    /// No keys: auth is off.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The principal whose key `presented` is, comparing in constant time
    /// against every key.
    pub fn check(&self, presented: &str) -> Option<&str> {
        let p = presented.as_bytes();
        let mut found: Option<usize> = None;
        for (i, (_, key)) in self.entries.iter().enumerate() {
            // Every key is compared in full, whatever matched before.
            if ct_eq(p, key) && found.is_none() {
                found = Some(i);
            }
        }
        found.map(|i| &*self.entries[i].0)
    }
}

/// `name:key` lines; `#` starts a comment line; blank lines are skipped.
fn parse_file(text: &str) -> Result<Vec<Entry>, String> {
    let mut out: Vec<Entry> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, key) = match line.split_once(':') {
            Some((name, key)) => (name.trim().to_string(), key.trim()),
            None => (format!("line-{}", n + 1), line),
        };
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
        {
            return Err(format!(
                "line {}: a name is letters, digits and - _ . @ only",
                n + 1
            ));
        }
        check_key(key).map_err(|e| format!("line {}: {e}", n + 1))?;
        if out.iter().any(|(p, _)| **p == *name) {
            return Err(format!("line {}: the name {name} is used twice", n + 1));
        }
        out.push((name.into(), key.as_bytes().into()));
    }
    Ok(out)
}

fn check_key(k: &str) -> Result<(), String> {
    if k.len() < 8 {
        return Err("a key has at least 8 characters".into());
    }
    if !k.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err("a key is visible ASCII without spaces".into());
    }
    Ok(())
}

/// Equal bytes, in time that depends only on the lengths.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// The key a request presents: `Authorization: Bearer`, `X-Api-Key`, or
/// (when `query_token` allows it) the query's `access_token`.
pub fn presented<'a>(
    authorization: Option<&'a str>,
    x_api_key: Option<&'a str>,
    access_token: Option<&'a str>,
) -> Presented<'a> {
    if let Some(v) = authorization {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Presented::Key(v[7..].trim());
        }
    }
    if let Some(k) = x_api_key {
        return Presented::Key(k.trim());
    }
    match access_token {
        Some(t) => Presented::Key(t),
        None => Presented::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_equality() {
        let cases: [(&[u8], &[u8], bool); 6] = [
            (b"secret-key-1", b"secret-key-1", true),
            (b"secret-key-1", b"secret-key-2", false),
            (b"secret-key-1", b"secret-key-12", false),
            (b"", b"", true),
            (b"a", b"", false),
            (b"\x00", b"", false),
        ];
        for (a, b, want) in cases {
            assert_eq!(ct_eq(a, b), want, "{a:?} {b:?}");
        }
    }

    #[test]
    fn principals_from_flags_and_file() {
        let dir = std::env::temp_dir().join(format!("sluice-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("keys");
        std::fs::write(
            &f,
            "# team keys\nalice: alice-key-123\n\n  bob:bob-key-4567  \nbare-key-890\n",
        )
        .unwrap();
        let keys = Keys::load(&["flag-key-aaa".into(), "flag-key-bbb".into()], Some(&f)).unwrap();
        assert_eq!(keys.len(), 5);
        assert_eq!(keys.check("flag-key-aaa"), Some("key-1"));
        assert_eq!(keys.check("flag-key-bbb"), Some("key-2"));
        assert_eq!(keys.check("alice-key-123"), Some("alice"));
        assert_eq!(keys.check("bob-key-4567"), Some("bob"));
        assert_eq!(keys.check("bare-key-890"), Some("line-5"));
        assert_eq!(keys.check("alice-key-12"), None);
        assert_eq!(keys.check(""), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_files_and_keys_are_refused_with_the_line() {
        let cases = [
            ("a b:key-key-key\n", "line 1"),
            ("alice:short\n", "at least 8"),
            ("alice:key with space\n", "visible ASCII"),
            ("alice:key-key-key\nalice:other-key-key\n", "used twice"),
        ];
        for (text, want) in cases {
            let e = parse_file(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains("key-key-key"), "no key in messages: {e}");
        }
        let e = Keys::load(&["short".into()], None).unwrap_err();
        assert!(e.contains("--api-key number 1"), "{e}");
        assert!(!e.contains("short\""), "{e}");
    }

    #[test]
    fn where_a_key_is_presented() {
        assert_eq!(
            presented(Some("Bearer abc"), None, None),
            Presented::Key("abc")
        );
        assert_eq!(
            presented(Some("bearer  abc "), None, None),
            Presented::Key("abc")
        );
        assert_eq!(presented(None, Some("k"), None), Presented::Key("k"));
        assert_eq!(presented(None, None, Some("t")), Presented::Key("t"));
        assert_eq!(presented(Some("Basic xyz"), None, None), Presented::None);
        assert_eq!(presented(None, None, None), Presented::None);
        // A header wins over the query.
        assert_eq!(
            presented(Some("Bearer h"), None, Some("q")),
            Presented::Key("h")
        );
    }
}
