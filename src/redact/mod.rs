//! Streaming-safe redaction: the rule set built once at start
//! ([`Redactor`]) and the per-stream stage that applies it ([`RedactStage`]).
//! It replaces every match of `--redact REGEX` and of the builtin rules
//! (`--redact-builtin`) with `--redact-replacement` before the text reaches
//! an encoder, catches a secret however the model splits it into tokens,
//! and holds back only text that could still become part of a match.
//!
//! # Wiring (for the engine and the config)
//!
//! At start, once, from the flags:
//!
//! ```text
//! // Err(msg): print msg and exit (it names the flag and the pattern).
//! let r = Redactor::new(&cfg.redact, cfg.redact_builtin,
//!                       &cfg.redact_replacement, cfg.redact_max_hold)?;
//! let r: Arc<Redactor> = Arc::new(r.count_into(Arc::clone(&metrics)));
//! ```
//!
//! `--redact REGEX` is repeatable (`Vec<String>`, at most
//! [`MAX_CUSTOM_RULES`]), `--redact-builtin` a bool, `--redact-replacement
//! TEXT` defaults to `[REDACTED]`, `--redact-max-hold BYTES` is an
//! `Option<usize>`. Build a redactor only when `--redact` or
//! `--redact-builtin` is given (an empty one passes text through, at a cost).
//!
//! Per stream, streaming or not, on every endpoint:
//! `stream.push_stage(Box::new(r.stage()))`, first in the chain, so no later
//! stage (a replay log) ever sees a secret. Text from separate channels
//! (content, reasoning, refusal) needs a stage each: a match never spans
//! two channels. [`Stage::flush`] at the stream's end hands on what is held.
//!
//! Counts: each redaction adds one to `Metrics::redactions[slot]` of the
//! metrics given to [`Redactor::count_into`]; [`Redactor::count_into`] also
//! names the configured rules in `Metrics::redaction_labels`, and the
//! exposition renders `sluice_redactions_total{rule="…"}` for exactly
//! those: `email`, `card`, `openai_key`, `aws_access_key`, `github_token`,
//! `slack_token`, `jwt` ([`BUILTIN_RULES`]), then `custom_1`, `custom_2`, …
//! for the `--redact` patterns in order.
//!
//! # Semantics
//!
//! All rules are one leftmost-first search: scanning left to right, the
//! first position where any rule matches wins, and at that position the
//! first rule in priority order that matches (e-mail, JWT, OpenAI, GitHub,
//! Slack, AWS, the custom rules in order, card last), with its preferred
//! (greedy) match; the search goes on after the match. A card candidate
//! is then checked with Luhn (`rules::card_end`); a candidate that fails is
//! emitted unchanged and the search goes on one character later. `\b` is
//! an ASCII word boundary. Output is a function of the whole text: any
//! split into tokens gives the same bytes as the text in one piece.
//!
//! # Holding back
//!
//! After each piece, the stage emits every byte before the earliest
//! position where a match could still *start and extend past the end of
//! the text seen so far*, and holds the rest. For each candidate position
//! `s` (left to right, from the first byte not yet emitted) it runs the
//! anchored lazy DFA of all rules from `s`, with the byte before `s` as
//! look-behind:
//!
//! - the DFA dies: the outcome at `s` is final (the last match state seen,
//!   or no match), whatever comes next;
//! - the DFA has read [`Redactor::max_hold`] `+ 1` bytes: final too (no
//!   match is longer; matches are seen one byte late, hence the `+ 1`);
//! - the text runs out with the DFA alive: the outcome is open, so `s` and
//!   everything after it is held — unless the DFA is in a match state whose
//!   every transition, and end of input, is dead (the match is complete and
//!   nothing can extend it: released at once rather than one byte later).
//!
//! At the stream's end ([`Stage::flush`]) the DFA also takes its end-of-input
//! step (`$`, a trailing `\b`), so every outcome is final and nothing stays.
//!
//! Positions where nothing can start are skipped without touching the DFA:
//! a table built at start says, for every look-behind byte, which first
//! bytes keep the DFA alive. Inside a word the builtin rules' leading `\b`
//! fails, so with them only word starts cost a DFA walk (a custom rule
//! without `\b` may start anywhere, and is tried there). Only the held
//! suffix is searched again when the next piece arrives.
//!
//! Guarantees: held text is always a suffix of the text seen, starts at a
//! character boundary (no pattern can start inside a UTF-8 sequence), and is
//! never longer than [`Redactor::max_hold`] (the longest match any rule can
//! have, or `--redact-max-hold`), since a position whose DFA walk is that
//! long is final. With only key-prefix rules (`\bsk-…`), a word
//! that is not a key prefix is emitted in the same call it arrives in;
//! with the e-mail rule, a run of address characters (letters, digits,
//! `._%+-`) is held until the first character that cannot continue it (a
//! space, a comma) arrives; likewise digits with the card rule until a
//! character that is not a digit, space or dash follows. When nothing can
//! start, nothing is held and ordinary text is passed on without a copy.
//!
//! # Unbounded patterns and `--redact-max-hold`
//!
//! Each pattern's longest match is measured with `regex-syntax`
//! (`maximum_len`). One that is unbounded (`*`, `+`, `{n,}`) is refused at
//! start, naming the repetition and a bounded rewrite, unless
//! `--redact-max-hold N` is set. Then no match may be longer than `N` bytes
//! (for every rule, builtins too): at each position the DFA reads at most
//! `N + 1` bytes, and the match taken is the one the leftmost-first search
//! prefers among those of at most `N` bytes; what follows it is scanned
//! afresh. So a secret longer than `N` bytes is redacted in its first `N`
//! bytes only and the rest of it is emitted as ordinary text — e.g. with
//! `--redact 'sk-[a-z]+' --redact-max-hold 8`, `sk-abcdefghij` becomes
//! `[REDACTED]fghij`. A pattern whose shortest match is longer than `N` is
//! refused, since it could never match.

mod rules;

pub use rules::{rule_label, BUILTIN_RULES, MAX_CUSTOM_RULES, RULE_SLOTS};

use std::panic::{RefUnwindSafe, UnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::hybrid::LazyStateID;
use regex_automata::nfa::thompson::{self, WhichCaptures};
use regex_automata::util::pool::{Pool, PoolGuard};
use regex_automata::util::start;
use regex_automata::{Anchored, MatchKind};

use crate::metrics::Metrics;
use crate::stream::Stage;

/// Lazy-DFA caches, shared by the streams of a loop (a cache is sized by the
/// NFA, hundreds of kilobytes with the builtins: one per stream would cost
/// more than the stream).
type CacheFn = Box<dyn Fn() -> Cache + Send + Sync + UnwindSafe + RefUnwindSafe>;
type Caches = Pool<Cache, CacheFn>;

/// What one rule (one DFA pattern) does when it matches.
#[derive(Debug, Clone, Copy)]
struct Rule {
    /// The counter slot, and so the metric label.
    slot: usize,
    /// A card: Luhn decides.
    luhn: bool,
}

/// The compiled rule set, built once at start and shared by every stream
/// (in an `Arc`). See the module docs for what it matches and holds.
pub struct Redactor {
    dfa: DFA,
    caches: Caches,
    /// By DFA pattern id.
    rules: Box<[Rule]>,
    /// `first[lb]`: a bit set of the bytes at which the DFA, started with
    /// look-behind byte `lb` (256: none, the text's start), survives its
    /// first step. A position whose byte is not in it is skipped.
    first: Box<[[u64; 4]; 257]>,
    /// One byte of each DFA byte class, to test whether a state is final.
    class_bytes: Box<[u8]>,
    /// The most bytes a match may span, and so the most a stream holds.
    max_hold: usize,
    replacement: Box<str>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("rules", &self.labels().collect::<Vec<_>>())
            .field("max_hold", &self.max_hold)
            .field("replacement", &self.replacement)
            .finish_non_exhaustive()
    }
}

/// The outcome of the anchored search at one position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// No rule matches here, whatever follows.
    Nothing,
    /// This match, whatever follows: DFA pattern `pid`, ending at `end`.
    Match { pid: usize, end: usize },
    /// More text could change the outcome.
    Open,
}

impl Redactor {
    /// Compiles the rule set: `patterns` (`--redact`, in order: `custom_1`,
    /// …), the builtin rules if `builtin`, `replacement` for every match,
    /// and `max_hold` (`--redact-max-hold`) to admit unbounded patterns.
    ///
    /// The error is a message for the user naming the flag and the pattern,
    /// e.g. `--redact 'a.*b': matches can be unbounded (.*); bound it, e.g.
    /// a.{0,64}b, or set --redact-max-hold`.
    pub fn new(
        patterns: &[String],
        builtin: bool,
        replacement: &str,
        max_hold: Option<usize>,
    ) -> Result<Redactor, String> {
        if patterns.len() > MAX_CUSTOM_RULES {
            return Err(format!(
                "--redact: at most {MAX_CUSTOM_RULES} patterns, got {}; join some with |",
                patterns.len()
            ));
        }
        if max_hold == Some(0) {
            return Err("--redact-max-hold must be at least 1 byte".into());
        }
        let capped = max_hold.is_some();
        let mut parsed = Vec::new();
        let mut actions = Vec::new();
        let mut names = Vec::new();
        let mut add = |name: String, pattern: &str, rule: Rule| -> Result<(), String> {
            parsed.push(rules::parse(&name, pattern, capped)?);
            actions.push(rule);
            names.push(name);
            Ok(())
        };
        if builtin {
            for (slot, pattern) in rules::BUILTIN_PATTERNS {
                let name = format!("--redact-builtin ({})", BUILTIN_RULES[slot]);
                add(name, pattern, Rule { slot, luhn: false })?;
            }
        }
        for (i, p) in patterns.iter().enumerate() {
            let slot = BUILTIN_RULES.len() + i;
            add(format!("--redact '{p}'"), p, Rule { slot, luhn: false })?;
        }
        if builtin {
            let name = "--redact-builtin (card)".to_string();
            let rule = Rule {
                slot: rules::CARD,
                luhn: true,
            };
            add(name, rules::CARD_PATTERN, rule)?;
        }
        let longest = parsed
            .iter()
            .map(|p| p.max_len.unwrap_or(usize::MAX))
            .max()
            .unwrap_or(0);
        let max_hold = max_hold.map_or(longest, |cap| cap.min(longest));
        if let Some((p, name)) = parsed
            .iter()
            .zip(&names)
            .find(|(p, _)| p.min_len > max_hold)
        {
            return Err(format!(
                "--redact-max-hold {max_hold} is shorter than the shortest match of {name} ({} bytes): it could never be redacted",
                p.min_len
            ));
        }
        let hirs: Vec<_> = parsed.into_iter().map(|p| p.hir).collect();
        let nfa = thompson::Compiler::new()
            .configure(thompson::Config::new().which_captures(WhichCaptures::None))
            .build_many_from_hir(&hirs)
            .map_err(|e| format!("--redact: the rules do not compile: {e}"))?;
        let dfa = DFA::builder()
            .configure(DFA::config().match_kind(MatchKind::LeftmostFirst))
            .build_from_nfa(nfa)
            .map_err(|e| format!("--redact: the rules do not compile: {e}"))?;
        let first = first_bytes(&dfa);
        let class_bytes = dfa
            .byte_classes()
            .representatives(..)
            .filter_map(|u| u.as_u8())
            .collect();
        let for_caches = dfa.clone();
        let create: CacheFn = Box::new(move || for_caches.create_cache());
        let metrics = Arc::new(Metrics::default());
        let r = Redactor {
            dfa,
            caches: Pool::new(create),
            rules: actions.into(),
            first,
            class_bytes,
            max_hold,
            replacement: replacement.into(),
            metrics,
        };
        r.mark_rules();
        Ok(r)
    }

    /// Counts redactions into `metrics` (`sluice_redactions_total`) and
    /// marks this set's rules there, so each is rendered even at zero.
    pub fn count_into(mut self, metrics: Arc<Metrics>) -> Redactor {
        self.metrics = metrics;
        self.mark_rules();
        self
    }

    fn mark_rules(&self) {
        let mut slots: Vec<usize> = self.rules.iter().map(|r| r.slot).collect();
        slots.sort_unstable();
        let labels = slots
            .into_iter()
            .map(|s| (s, rule_label(s).into_owned()))
            .collect();
        // The first redactor of a process names the rules; tests that build
        // several into one Metrics build the same set.
        let _ = self.metrics.redaction_labels.set(labels);
    }

    /// A new stage for one stream. Cheap: an `Arc` and two empty buffers.
    pub fn stage(self: &Arc<Self>) -> RedactStage {
        RedactStage {
            redactor: Arc::clone(self),
            held: String::new(),
            before: None,
            out: String::new(),
            redacted: 0,
        }
    }

    /// `text` redacted as a whole (what a stage given `text` in any pieces,
    /// then flushed, passes on, concatenated).
    pub fn redact(&self, text: &str) -> String {
        let mut out = String::new();
        let mut all = String::new();
        self.pass(None, text, true, &mut out, &mut |t| all.push_str(t));
        all
    }

    /// The most bytes a stream ever holds back: the longest match any rule
    /// can have, or `--redact-max-hold` if that is smaller.
    pub fn max_hold(&self) -> usize {
        self.max_hold
    }

    /// The `rule` labels of this set, in slot order.
    pub fn labels(&self) -> impl Iterator<Item = std::borrow::Cow<'static, str>> + '_ {
        let mut slots: Vec<_> = self.rules.iter().map(|r| r.slot).collect();
        slots.sort_unstable();
        slots.into_iter().map(rule_label)
    }

    /// Redactions counted under `label` so far (in the metrics given to
    /// [`Redactor::count_into`], or the redactor's own).
    pub fn count(&self, label: &str) -> u64 {
        (0..RULE_SLOTS)
            .find(|&s| rule_label(s) == label)
            .map_or(0, |s| self.metrics.redactions[s].load(Relaxed))
    }

    /// Scans `hay` (the text not yet emitted; `before` is the byte before
    /// it), passes on to `next` everything up to where it must hold, with
    /// matches replaced, and returns that position. `eoi`: the text ends
    /// here, nothing is held. `out` is scratch for the replaced text.
    fn pass(
        &self,
        before: Option<u8>,
        hay: &str,
        eoi: bool,
        out: &mut String,
        next: &mut dyn FnMut(&str),
    ) -> (usize, u64) {
        let mut done = 0;
        let mut n = 0;
        let cut = self.scan(before, hay.as_bytes(), eoi, &mut |start, end, slot| {
            if n == 0 {
                out.clear();
            }
            out.push_str(&hay[done..start]);
            out.push_str(&self.replacement);
            done = end;
            n += 1;
            self.metrics.redactions[slot].fetch_add(1, Relaxed);
        });
        if n > 0 {
            out.push_str(&hay[done..cut]);
            next(out);
        } else if cut > 0 {
            next(&hay[..cut]);
        }
        (cut, n)
    }

    /// The leftmost-first search over `hay`, calling `hit(start, end, slot)`
    /// for each final match in order; returns where the final part ends
    /// (`hay.len()`, or the first position whose outcome is still open).
    fn scan(
        &self,
        before: Option<u8>,
        hay: &[u8],
        eoi: bool,
        hit: &mut dyn FnMut(usize, usize, usize),
    ) -> usize {
        // Taken only when some position needs the DFA: ordinary text that
        // no rule can start in never touches the pool.
        let mut cache: Option<PoolGuard<'_, Cache, CacheFn>> = None;
        let mut s = 0;
        while s < hay.len() {
            let lb = if s == 0 { before } else { Some(hay[s - 1]) };
            let row = &self.first[lb.map_or(256, usize::from)];
            let b = hay[s];
            if row[usize::from(b >> 6)] >> (b & 63) & 1 == 0 {
                s += 1;
                continue;
            }
            let cache = cache.get_or_insert_with(|| self.caches.get());
            match self.at(cache, lb, hay, s, eoi) {
                At::Open => return s,
                At::Nothing => s += 1,
                At::Match { pid, end } => {
                    let rule = self.rules[pid];
                    let end = if rule.luhn {
                        rules::card_end(hay, s, end)
                    } else {
                        Some(end)
                    };
                    match end {
                        Some(end) => {
                            hit(s, end, rule.slot);
                            s = end;
                        }
                        None => s += 1,
                    }
                }
            }
        }
        hay.len()
    }

    /// The anchored search at `s`, with look-behind `lb`.
    fn at(&self, cache: &mut Cache, lb: Option<u8>, hay: &[u8], s: usize, eoi: bool) -> At {
        let config = start::Config::new().anchored(Anchored::Yes).look_behind(lb);
        // The DFA has no quit bytes, gives up never (no minimum cache clear
        // count) and supports anchored starts: these calls cannot fail.
        let Ok(mut sid) = self.dfa.start_state(cache, &config) else {
            return At::Nothing;
        };
        let mut last = None;
        // Matches are reported one byte late: reading `max_hold + 1` bytes
        // sees every match of at most `max_hold`.
        let stop = hay
            .len()
            .min(s.saturating_add(self.max_hold).saturating_add(1));
        for (i, &b) in hay[s..stop].iter().enumerate() {
            let Ok(n) = self.dfa.next_state(cache, sid, b) else {
                return settled(last);
            };
            sid = n;
            if sid.is_tagged() {
                if sid.is_match() {
                    last = Some((self.dfa.match_pattern(cache, sid, 0).as_usize(), s + i));
                } else if sid.is_dead() {
                    return settled(last);
                }
            }
        }
        if stop - s > self.max_hold {
            return settled(last);
        }
        if eoi {
            if let Ok(e) = self.dfa.next_eoi_state(cache, sid) {
                if e.is_match() {
                    last = Some((self.dfa.match_pattern(cache, e, 0).as_usize(), hay.len()));
                }
            }
            return settled(last);
        }
        if sid.is_match() && self.is_final(cache, sid) {
            return settled(last);
        }
        At::Open
    }

    /// A match state from which every byte, and the end of input, leads to
    /// the dead state: the match is complete and nothing can follow it.
    fn is_final(&self, cache: &mut Cache, sid: LazyStateID) -> bool {
        self.class_bytes.iter().all(|&b| {
            self.dfa
                .next_state(cache, sid, b)
                .is_ok_and(|n| n.is_dead())
        }) && self
            .dfa
            .next_eoi_state(cache, sid)
            .is_ok_and(|e| !e.is_match())
    }
}

fn settled(last: Option<(usize, usize)>) -> At {
    match last {
        Some((pid, end)) => At::Match { pid, end },
        None => At::Nothing,
    }
}

/// For every look-behind byte (and none), the bytes at which a match can
/// start: the DFA is not dead after them. Continuation bytes of UTF-8 never
/// start a match (every pattern matches valid UTF-8 only); leaving them out
/// makes that explicit, so held text always starts on a character.
fn first_bytes(dfa: &DFA) -> Box<[[u64; 4]; 257]> {
    let mut cache = dfa.create_cache();
    let mut first = Box::new([[0u64; 4]; 257]);
    for (lb, row) in first.iter_mut().enumerate() {
        let look = u8::try_from(lb).ok();
        let config = start::Config::new()
            .anchored(Anchored::Yes)
            .look_behind(look);
        let Ok(sid) = dfa.start_state(&mut cache, &config) else {
            continue;
        };
        for b in 0..=255u8 {
            if b & 0xC0 == 0x80 {
                continue;
            }
            if dfa
                .next_state(&mut cache, sid, b)
                .is_ok_and(|n| !n.is_dead())
            {
                row[usize::from(b >> 6)] |= 1 << (b & 63);
            }
        }
    }
    first
}

/// One stream's redaction: the text held back and the byte before it.
/// Reuses its two buffers; allocates nothing while no text is held and
/// nothing is replaced.
pub struct RedactStage {
    redactor: Arc<Redactor>,
    /// Text seen but not yet passed on: it could still be part of a match.
    held: String,
    /// The byte before `held` in the text (what `\b` and `^` look at);
    /// `None` at the start of the text.
    before: Option<u8>,
    /// Scratch for text with replacements.
    out: String,
    redacted: u64,
}

impl RedactStage {
    /// Bytes held back now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Matches this stage has replaced.
    pub fn redacted(&self) -> u64 {
        self.redacted
    }
}

impl Stage for RedactStage {
    fn text(&mut self, text: &str, next: &mut dyn FnMut(&str)) {
        if text.is_empty() {
            return;
        }
        let r = &*self.redactor;
        if self.held.is_empty() {
            // The common case: scan the piece where it is, no copy.
            let (cut, n) = r.pass(self.before, text, false, &mut self.out, next);
            self.redacted += n;
            if cut > 0 {
                self.before = Some(text.as_bytes()[cut - 1]);
            }
            self.held.push_str(&text[cut..]);
        } else {
            self.held.push_str(text);
            let (cut, n) = r.pass(self.before, &self.held, false, &mut self.out, next);
            self.redacted += n;
            if cut > 0 {
                self.before = Some(self.held.as_bytes()[cut - 1]);
                self.held.drain(..cut);
            }
        }
    }

    fn flush(&mut self, next: &mut dyn FnMut(&str)) {
        if self.held.is_empty() {
            return;
        }
        let r = &*self.redactor;
        let (cut, n) = r.pass(self.before, &self.held, true, &mut self.out, next);
        self.redacted += n;
        debug_assert_eq!(cut, self.held.len(), "nothing is held at the end");
        self.before = self.held.as_bytes().last().copied();
        self.held.clear();
    }
}

/// The redaction rules the flags ask for, counting into `metrics`; none
/// when redaction is off. The error names the flag.
pub fn from_config(
    cfg: &crate::config::Config,
    metrics: &Arc<Metrics>,
) -> Result<Option<Arc<Redactor>>, String> {
    if cfg.redact.is_empty() && !cfg.redact_builtin {
        return Ok(None);
    }
    let r = Redactor::new(
        &cfg.redact,
        cfg.redact_builtin,
        &cfg.redact_replacement,
        cfg.redact_max_hold,
    )?;
    log::info!(
        "redaction on: {} rules, up to {} bytes held back",
        r.labels().count(),
        r.max_hold()
    );
    Ok(Some(Arc::new(r.count_into(metrics.clone()))))
}

#[cfg(test)]
mod tests;
