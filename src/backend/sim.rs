//! The simulated model: deterministic text from a fixed word list, starting
//! at a position given by the FNV-1a hash of the messages, so the same
//! messages give the same text on every endpoint and machine.
//!
//! [`SimText`] is the pure part (which word comes next); the event loop paces
//! it with timers (no thread per stream), and [`SimPoolBackend`] runs it on a
//! pool worker with sleeps, the way an upstream call blocks.

use std::time::Duration;

use super::{Backend, Finish, GenRequest, Message, TokenOut};
use crate::sse::StreamError;

/// Every token after the first starts with a space.
const WORDS: [&str; 64] = [
    " Once",
    " upon",
    " a",
    " time",
    " the",
    " river",
    " carried",
    " small",
    " boats",
    " past",
    " quiet",
    " towns",
    " where",
    " people",
    " listened",
    " for",
    " news",
    " from",
    " distant",
    " cities",
    " and",
    " every",
    " evening",
    " lanterns",
    " glowed",
    " along",
    " stone",
    " bridges",
    " while",
    " children",
    " counted",
    " stars",
    " above",
    " sleepy",
    " rooftops",
    " as",
    " bakers",
    " prepared",
    " bread",
    " before",
    " dawn",
    " brought",
    " markets",
    " full",
    " of",
    " colour",
    " music",
    " laughter",
    " stories",
    " travelled",
    " quickly",
    " between",
    " friends",
    " who",
    " gathered",
    " near",
    " warm",
    " fires",
    " sharing",
    " dreams",
    " about",
    " tomorrow",
    " with",
    " hope",
];

/// 64-bit FNV-1a's starting value.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// One byte of 64-bit FNV-1a.
#[inline]
fn fnv1a_byte(h: u64, b: u8) -> u64 {
    (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
}

/// 64-bit FNV-1a (the reference [`hash_and_words`] is tested against).
#[cfg(test)]
fn fnv1a(bytes: &[u8], h: u64) -> u64 {
    bytes.iter().fold(h, |h, &b| fnv1a_byte(h, b))
}

/// The position in the word list and length of one simulated answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimText {
    start: usize,
    /// Tokens this answer has.
    pub total: u32,
    /// `length` when `max_tokens` cut it short.
    pub cut: bool,
}

impl SimText {
    #[cfg(test)]
    pub fn new(messages: &[Message], max_tokens: u32, sim_tokens: u32) -> SimText {
        SimText::answer(messages, max_tokens, sim_tokens).0
    }

    /// The answer to `messages` and the prompt's `prompt_tokens` (the
    /// contract's whitespace-separated words), from one pass over the
    /// prompt's bytes: the hash is serial, so the pass is a short scalar
    /// loop (a word count of its own was vectorised into ~30 cache lines of
    /// code a cold request had to fetch, for a prompt of a few words).
    pub fn answer(messages: &[Message], max_tokens: u32, sim_tokens: u32) -> (SimText, u32) {
        let mut h = FNV_OFFSET;
        let mut words = 0;
        for m in messages {
            let (hash, n) = hash_and_words(&m.content, h);
            words += n;
            // A separator, so ["ab"] and ["a","b"] differ.
            h = fnv1a_byte(hash, 0);
        }
        let text = SimText {
            start: (h % WORDS.len() as u64) as usize,
            total: max_tokens.min(sim_tokens),
            cut: max_tokens < sim_tokens,
        };
        (text, words)
    }

    /// The `i`-th token's text.
    pub fn token(&self, i: u32) -> &'static str {
        let w = WORDS[(self.start + i as usize) % WORDS.len()];
        if i == 0 {
            &w[1..]
        } else {
            w
        }
    }

    pub fn finish_reason(&self) -> &'static str {
        if self.cut {
            "length"
        } else {
            "stop"
        }
    }
}

/// The contract's `prompt_tokens` for the simulated model: whitespace-separated words.
#[cfg(test)]
fn prompt_tokens(messages: &[Message]) -> u32 {
    SimText::answer(messages, 1, 1).1
}

/// 64-bit FNV-1a of `s` from `h`, and `s.split_whitespace().count()`: counted
/// over the bytes (the ASCII White_Space characters `\t` `\n` VT FF `\r`
/// and space) and, when `s` has a non-ASCII byte, counted again by
/// `split_whitespace` (decoding every char costs ~800 instructions a
/// request, so only text that needs it pays it).
fn hash_and_words(s: &str, mut h: u64) -> (u64, u32) {
    let mut n = 0;
    let mut in_word = false;
    let mut high = 0u8;
    for &b in s.as_bytes() {
        h = fnv1a_byte(h, b);
        let word = !matches!(b, b' ' | b'\t'..=b'\r');
        n += u32::from(word && !in_word);
        in_word = word;
        high |= b;
    }
    if high >= 0x80 {
        n = s.split_whitespace().count() as u32;
    }
    (h, n)
}

/// The simulated model on a worker thread (`--backend sim-pool`).
#[derive(Debug, Clone)]
pub struct SimPoolBackend {
    pub ttft: Duration,
    pub itl: Duration,
    pub sim_tokens: u32,
}

impl Backend for SimPoolBackend {
    fn generate(&self, req: &GenRequest, out: &dyn TokenOut) -> Result<Finish, StreamError> {
        let (text, prompt_tokens) = SimText::answer(&req.messages, req.max_tokens, self.sim_tokens);
        for i in 0..text.total {
            let pause = if i == 0 { self.ttft } else { self.itl };
            if out.sleep(pause).is_err() || out.push_token(text.token(i)).is_err() {
                // Cancelled: the loop ignores whatever we return now.
                break;
            }
        }
        Ok(Finish {
            finish_reason: text.finish_reason().to_string(),
            prompt_tokens: Some(prompt_tokens),
            completion_tokens: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::record::{Call, Recorder};

    fn msgs(texts: &[&str]) -> Vec<Message> {
        texts
            .iter()
            .map(|t| Message {
                role: "user".into(),
                content: t.to_string(),
            })
            .collect()
    }

    #[test]
    fn deterministic_and_prompt_dependent() {
        let a = SimText::new(&msgs(&["hi"]), 64, 64);
        let b = SimText::new(&msgs(&["hi"]), 64, 64);
        assert_eq!(a, b);
        let words: String = (0..a.total).map(|i| a.token(i)).collect();
        assert!(!words.starts_with(' '));
        assert_eq!(words.split(' ').count(), 64);
        let c = SimText::new(&msgs(&["h", "i"]), 64, 64);
        assert_ne!(a.start, c.start);
    }

    #[test]
    fn length_is_min_of_max_tokens_and_sim_tokens() {
        let t = SimText::new(&msgs(&["x"]), 5, 64);
        assert_eq!((t.total, t.finish_reason()), (5, "length"));
        let t = SimText::new(&msgs(&["x"]), 100, 64);
        assert_eq!((t.total, t.finish_reason()), (64, "stop"));
    }

    #[test]
    fn fnv1a_known_values() {
        assert_eq!(fnv1a(b"", FNV_OFFSET), FNV_OFFSET);
        assert_eq!(fnv1a(b"a", FNV_OFFSET), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn prompt_tokens_counts_words() {
        assert_eq!(
            prompt_tokens(&msgs(&["Tell me a story", "  and  more "])),
            6
        );
    }

    #[test]
    fn words_counts_as_split_whitespace_does() {
        for s in [
            "",
            " ",
            "one",
            " one ",
            "Tell me a story",
            "a\tb\nc\x0bd\x0ce\rf",
            "  and  more ",
            "x\x1fy",
            "caf\u{e9} au lait",
            "a\u{3000}b\u{a0}c",
            "\u{85}",
        ] {
            let (h, n) = hash_and_words(s, FNV_OFFSET);
            assert_eq!(n, s.split_whitespace().count() as u32, "{s:?}");
            assert_eq!(h, fnv1a(s.as_bytes(), FNV_OFFSET), "{s:?}");
        }
    }

    fn sim_pool(max_tokens: u32) -> (SimPoolBackend, GenRequest) {
        let backend = SimPoolBackend {
            ttft: Duration::from_millis(7),
            itl: Duration::from_millis(3),
            sim_tokens: 4,
        };
        let req = GenRequest {
            messages: msgs(&["Tell me a story"]),
            max_tokens,
            ..GenRequest::default()
        };
        (backend, req)
    }

    #[test]
    fn the_pool_form_paces_the_same_text_with_sleeps() {
        let (backend, req) = sim_pool(64);
        let out = Recorder::new();
        let finish = backend.generate(&req, &out).unwrap();
        let text = SimText::new(&req.messages, 64, 4);
        let mut expected = Vec::new();
        for i in 0..4 {
            let pause = if i == 0 { 7 } else { 3 };
            expected.push(Call::Sleep(Duration::from_millis(pause)));
            expected.push(Call::Token(text.token(i).to_string()));
        }
        assert_eq!(out.calls(), expected);
        assert_eq!(
            finish,
            Finish {
                finish_reason: "stop".into(),
                prompt_tokens: Some(4),
                completion_tokens: None,
            }
        );
        let (backend, req) = sim_pool(2);
        let out = Recorder::new();
        let finish = backend.generate(&req, &out).unwrap();
        assert_eq!(out.tokens().len(), 2);
        assert_eq!(finish.finish_reason, "length");
    }

    #[test]
    fn the_pool_form_stops_at_a_cancel() {
        let (backend, req) = sim_pool(64);
        let out = Recorder::cancel_after(2);
        backend.generate(&req, &out).unwrap();
        // Two tokens, then the next pause sees the cancel: nothing more asked.
        assert_eq!(out.tokens().len(), 2);
        assert_eq!(out.calls().len(), 4);
    }
}
