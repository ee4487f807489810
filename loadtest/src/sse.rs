//! Incremental Server-Sent Events parser (the WHATWG event-stream rules):
//! lines end in CRLF, LF or CR (a CR at the end of one read and the LF at
//! the start of the next are one line end), `data` lines join with `\n`,
//! comments (`:`) are counted but not events, a blank line dispatches an
//! event when it has data. No sockets, no clocks.

/// One dispatched event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    /// The `event` field; empty means the default type, `message`.
    pub name: String,
    pub data: String,
    /// The `id` field of this event, if it had one.
    pub id: Option<String>,
}

/// Longest line we buffer; a longer one is cut (its tail is ignored).
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, Default)]
pub struct Parser {
    line: Vec<u8>,
    /// The previous byte was a CR that ended a line.
    after_cr: bool,
    /// The event being read (its strings reused from event to event, so a
    /// steady stream allocates nothing per event).
    ev: Event,
    has_data: bool,
    /// Comment lines seen (`: keep-alive` heartbeats of OpenAI-style servers).
    pub comments: u64,
}

impl Parser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; complete events are appended to `out` (for tests).
    #[cfg(test)]
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<Event>) {
        self.feed_with(input, &mut |e| out.push(e.clone()));
    }

    /// Feeds bytes; `on_event` sees each complete event as it ends.
    pub fn feed_with(&mut self, mut input: &[u8], on_event: &mut dyn FnMut(&Event)) {
        if self.after_cr && !input.is_empty() {
            self.after_cr = false;
            if input.first() == Some(&b'\n') {
                input = &input[1..];
            }
        }
        while !input.is_empty() {
            match memchr::memchr2(b'\n', b'\r', input) {
                None => {
                    self.push_line_bytes(input);
                    return;
                }
                Some(i) => {
                    self.push_line_bytes(&input[..i]);
                    let cr = input[i] == b'\r';
                    input = &input[i + 1..];
                    if cr {
                        if input.is_empty() {
                            self.after_cr = true;
                        } else if input[0] == b'\n' {
                            input = &input[1..];
                        }
                    }
                    self.end_line(on_event);
                }
            }
        }
    }

    fn push_line_bytes(&mut self, b: &[u8]) {
        let room = MAX_LINE.saturating_sub(self.line.len());
        self.line.extend_from_slice(&b[..b.len().min(room)]);
    }

    fn end_line(&mut self, on_event: &mut dyn FnMut(&Event)) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            if self.has_data {
                on_event(&self.ev);
                self.ev.data.clear();
            }
            self.ev.name.clear();
            self.ev.id = None;
            self.has_data = false;
        } else if line[0] == b':' {
            self.comments += 1;
        } else {
            let (field, value) = match line.iter().position(|&b| b == b':') {
                Some(i) => {
                    let v = &line[i + 1..];
                    (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
                }
                None => (&line[..], &b""[..]),
            };
            // Valid UTF-8 (the usual case) is borrowed, not copied.
            // ASCII (the usual case) is borrowed as it is, without UTF-8
            // validation's per-character work.
            let value = if value.is_ascii() {
                // SAFETY: ASCII bytes are valid UTF-8.
                std::borrow::Cow::Borrowed(unsafe { std::str::from_utf8_unchecked(value) })
            } else {
                String::from_utf8_lossy(value)
            };
            match field {
                b"data" => {
                    if self.has_data {
                        self.ev.data.push('\n');
                    }
                    self.ev.data.push_str(&value);
                    self.has_data = true;
                }
                b"event" => {
                    self.ev.name.clear();
                    self.ev.name.push_str(&value);
                }
                b"id" if !value.contains('\0') => self.ev.id = Some(value.into_owned()),
                _ => {}
            }
        }
        self.line = line;
        self.line.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(name: &str, data: &str, id: Option<&str>) -> Event {
        Event {
            name: name.into(),
            data: data.into(),
            id: id.map(Into::into),
        }
    }

    /// Feeds `wire` split at every byte (and at two points), expecting the same events.
    fn check(wire: &[u8], want: &[Event]) {
        let mut whole = Vec::new();
        Parser::new().feed(wire, &mut whole);
        assert_eq!(whole, want, "whole {:?}", String::from_utf8_lossy(wire));
        for i in 0..=wire.len() {
            for j in i..=wire.len() {
                let mut p = Parser::new();
                let mut out = Vec::new();
                p.feed(&wire[..i], &mut out);
                p.feed(&wire[i..j], &mut out);
                p.feed(&wire[j..], &mut out);
                assert_eq!(
                    out,
                    want,
                    "split {i},{j} of {:?}",
                    String::from_utf8_lossy(wire)
                );
            }
        }
        let mut p = Parser::new();
        let mut out = Vec::new();
        for b in wire {
            p.feed(std::slice::from_ref(b), &mut out);
        }
        assert_eq!(out, want, "byte by byte");
    }

    #[test]
    fn table() {
        let cases: Vec<(&[u8], Vec<Event>)> = vec![
            (
                b"event: token\ndata: {\"t\":\"Hi\"}\n\n",
                vec![ev("token", "{\"t\":\"Hi\"}", None)],
            ),
            (
                b"event: token\r\ndata: a\r\n\r\nevent: done\r\nid: s:2\r\ndata: b\r\n\r\n",
                vec![ev("token", "a", None), ev("done", "b", Some("s:2"))],
            ),
            (b"data: x\rdata: y\r\r", vec![ev("", "x\ny", None)]),
            (
                b": keep-alive\n\ndata: [DONE]\n\n",
                vec![ev("", "[DONE]", None)],
            ),
            (b"data:nospace\n\n", vec![ev("", "nospace", None)]),
            (b"event: ping\n\n", vec![]),
            (b"data\n\n", vec![ev("", "", None)]),
            (
                b"retry: 1000\nunknown: 1\ndata: z\n\n",
                vec![ev("", "z", None)],
            ),
            (b"data: incomplete\n", vec![]),
            (
                "data: {\"t\":\"h\u{e9}\u{1F600}\"}\n\n".as_bytes(),
                vec![ev("", "{\"t\":\"h\u{e9}\u{1F600}\"}", None)],
            ),
        ];
        for (wire, want) in &cases {
            check(wire, want);
        }
    }

    #[test]
    fn counts_comments() {
        let mut p = Parser::new();
        p.feed(b": ping\r\n\r\n: ping\n", &mut Vec::new());
        assert_eq!(p.comments, 2);
    }
}
