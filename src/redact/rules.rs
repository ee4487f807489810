//! The rules: the builtin patterns and their bounds, the checks a
//! `--redact` pattern must pass before it is compiled (it parses, it cannot
//! match empty text, its matches are bounded or capped), and the Luhn check
//! that decides whether a card-shaped candidate is redacted.
//!
//! Every pattern is turned into a [`Hir`] here; `mod.rs` compiles them all
//! into one lazy DFA.

use regex_syntax::ast::{self, Ast, RepetitionKind, RepetitionRange};
use regex_syntax::hir::{self, Hir, HirKind, Look};

/// The builtin rules, in metric-slot order: slot `i` is labelled
/// `BUILTIN_RULES[i]`. Custom rules take the slots after them.
pub const BUILTIN_RULES: [&str; 7] = [
    "email",
    "card",
    "openai_key",
    "aws_access_key",
    "github_token",
    "slack_token",
    "jwt",
];

/// The most `--redact` patterns: each has its own slot in the fixed
/// `sluice_redactions_total` array.
pub const MAX_CUSTOM_RULES: usize = 16;

/// Slots in the redaction counter array: the builtins, then `custom_1` ….
pub const RULE_SLOTS: usize = BUILTIN_RULES.len() + MAX_CUSTOM_RULES;

// The metrics keep one counter a slot.
const _: () = assert!(RULE_SLOTS == crate::metrics::REDACTION_SLOTS);

pub(super) const EMAIL: usize = 0;
pub(super) const CARD: usize = 1;

/// The `rule` label of counter slot `slot`.
pub fn rule_label(slot: usize) -> std::borrow::Cow<'static, str> {
    match BUILTIN_RULES.get(slot) {
        Some(name) => (*name).into(),
        None => format!("custom_{}", slot - BUILTIN_RULES.len() + 1).into(),
    }
}

/// The builtin patterns, in priority order (at one start position the first
/// rule here that matches wins), with the slot each counts in.
///
/// Every repetition is bounded, so every rule has a maximum match length
/// and a stream never holds more than the longest (the JWT, 6,152 bytes).
/// `\b` is an ASCII word boundary: a key glued to the end of a word is not
/// a key, and a position inside a word is skipped after one byte.
///
/// - `email` first, so an address whose local part looks like a key is
///   redacted whole: local part 1–64 of `A-Za-z0-9._%+-` (starting with a
///   letter, digit or `_`), 1–8 domain labels of 1–63, a 2–24 letter TLD.
/// - `jwt`: `eyJ` header (8–1024 base64url) `.` `eyJ` payload (8–4096) `.`
///   signature (0–1024: `alg: none` has none).
/// - `openai_key`: `sk-` and 20–64 alphanumerics (legacy keys have 48), or
///   `sk-proj-` and 20–256 base64url (project keys have about 156). Plain
///   `sk-` admits no `-`, so `sk-learn-style` prose is left alone.
/// - `github_token`: `ghp_` `gho_` `ghu_` `ghs_` `ghr_` and 36–255
///   alphanumerics; `github_pat_` and 22–255 of `A-Za-z0-9_`.
/// - `slack_token`: `xox[abposr]-` and 10–255 of `A-Za-z0-9-`.
/// - `aws_access_key`: `AKIA` or `ASIA` and exactly 16 of `A-Z0-9`.
/// - `card` last of all: 13–19 digits, single spaces or dashes between
///   them, a word boundary at both ends; [`card_end`] then keeps the
///   longest prefix that passes Luhn, or nothing. It is last because that
///   check runs after the DFA chose it: a rejected candidate must not hide
///   another rule's match at the same place. Custom rules come just before it.
pub(super) const BUILTIN_PATTERNS: [(usize, &str); 6] = [
    (
        EMAIL,
        r"\b[A-Za-z0-9_][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}",
    ),
    (
        6,
        r"\beyJ[A-Za-z0-9_-]{8,1024}\.eyJ[A-Za-z0-9_-]{8,4096}\.[A-Za-z0-9_-]{0,1024}",
    ),
    (2, r"\bsk-(?:proj-[A-Za-z0-9_-]{20,256}|[A-Za-z0-9]{20,64})"),
    (
        4,
        r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})",
    ),
    (5, r"\bxox[abposr]-[A-Za-z0-9-]{10,255}"),
    (3, r"\b(?:AKIA|ASIA)[A-Z0-9]{16}"),
];

/// The card candidate pattern (see [`BUILTIN_PATTERNS`]); always last.
pub(super) const CARD_PATTERN: &str = r"\b[0-9](?:[ -]?[0-9]){12,18}\b";

/// One pattern, checked and ready to compile.
pub(super) struct Parsed {
    pub hir: Hir,
    /// The shortest and longest match in bytes (`None`: unbounded).
    pub min_len: usize,
    pub max_len: Option<usize>,
}

/// Parses `pattern` and checks what every rule must satisfy. `name` says
/// which flag it came from in messages, e.g. `--redact 'a.*b'`.
///
/// An unbounded pattern is refused unless `capped` (`--redact-max-hold` is
/// set); the message names the unbounded repetitions and suggests bounds.
pub(super) fn parse(name: &str, pattern: &str, capped: bool) -> Result<Parsed, String> {
    let hir = regex_syntax::ParserBuilder::new()
        .build()
        .parse(pattern)
        .map_err(|e| format!("{name}: not a valid regex:\n{e}"))?;
    let hir = ascii_word_boundaries(hir);
    let props = hir.properties();
    let min_len = props.minimum_len().unwrap_or(0);
    if min_len == 0 {
        return Err(format!(
            "{name}: can match empty text; a rule must match at least one character"
        ));
    }
    let max_len = props.maximum_len();
    if max_len.is_none() && !capped {
        return Err(unbounded_message(name, pattern));
    }
    Ok(Parsed {
        hir,
        min_len,
        max_len,
    })
}

/// "matches can be unbounded (.*); bound it, e.g. a.{0,64}b, or set
/// --redact-max-hold", naming the pattern's own unbounded repetitions.
fn unbounded_message(name: &str, pattern: &str) -> String {
    let ast = ast::parse::Parser::new().parse(pattern).ok();
    let mut reps = Vec::new();
    if let Some(ast) = &ast {
        unbounded_repetitions(ast, &mut reps);
    }
    // A nested repetition comes after the one around it in `reps` but
    // before it in the text: the rewrite below walks the text in order.
    reps.sort_by_key(|r| r.op.span.start.offset);
    let mut culprits = Vec::new();
    let mut bounded = String::new();
    let mut at = 0;
    for r in &reps {
        culprits.push(&pattern[r.span.start.offset..r.span.end.offset]);
        let min = match r.op.kind {
            RepetitionKind::OneOrMore => 1,
            RepetitionKind::Range(RepetitionRange::AtLeast(n)) => n,
            _ => 0,
        };
        bounded.push_str(&pattern[at..r.op.span.start.offset]);
        bounded.push_str(&format!("{{{min},{}}}", min.saturating_add(64)));
        if !r.greedy {
            bounded.push('?');
        }
        at = r.op.span.end.offset;
    }
    bounded.push_str(&pattern[at..]);
    if culprits.is_empty() {
        format!("{name}: matches can be unbounded; bound every repetition, e.g. {{0,64}}, or set --redact-max-hold")
    } else {
        format!(
            "{name}: matches can be unbounded ({}); bound it, e.g. {bounded}, or set --redact-max-hold",
            culprits.join(", ")
        )
    }
}

/// The repetitions in `ast` with no upper bound (`*`, `+`, `{n,}`), in the
/// order they appear.
fn unbounded_repetitions<'a>(ast: &'a Ast, out: &mut Vec<&'a ast::Repetition>) {
    match ast {
        Ast::Repetition(r) => {
            if matches!(
                r.op.kind,
                RepetitionKind::ZeroOrMore
                    | RepetitionKind::OneOrMore
                    | RepetitionKind::Range(RepetitionRange::AtLeast(_))
            ) {
                out.push(r);
            }
            unbounded_repetitions(&r.ast, out);
        }
        Ast::Group(g) => unbounded_repetitions(&g.ast, out),
        Ast::Alternation(a) => a.asts.iter().for_each(|a| unbounded_repetitions(a, out)),
        Ast::Concat(c) => c.asts.iter().for_each(|a| unbounded_repetitions(a, out)),
        _ => {}
    }
}

/// Replaces Unicode word boundaries with ASCII ones. The lazy DFA can only
/// decide a Unicode `\b` on ASCII text (it gives up on the first non-ASCII
/// byte), and a filter that gives up would leak; so here `\b` looks at ASCII
/// letters, digits and `_`, and any other character (`é` too) is a non-word.
fn ascii_word_boundaries(h: Hir) -> Hir {
    match h.into_kind() {
        HirKind::Look(look) => Hir::look(match look {
            Look::WordUnicode => Look::WordAscii,
            Look::WordUnicodeNegate => Look::WordAsciiNegate,
            Look::WordStartUnicode => Look::WordStartAscii,
            Look::WordEndUnicode => Look::WordEndAscii,
            Look::WordStartHalfUnicode => Look::WordStartHalfAscii,
            Look::WordEndHalfUnicode => Look::WordEndHalfAscii,
            other => other,
        }),
        HirKind::Repetition(r) => Hir::repetition(hir::Repetition {
            sub: Box::new(ascii_word_boundaries(*r.sub)),
            ..r
        }),
        HirKind::Capture(c) => Hir::capture(hir::Capture {
            sub: Box::new(ascii_word_boundaries(*c.sub)),
            ..c
        }),
        HirKind::Concat(v) => Hir::concat(v.into_iter().map(ascii_word_boundaries).collect()),
        HirKind::Alternation(v) => {
            Hir::alternation(v.into_iter().map(ascii_word_boundaries).collect())
        }
        HirKind::Empty => Hir::empty(),
        HirKind::Literal(l) => Hir::literal(l.0),
        HirKind::Class(c) => Hir::class(c),
    }
}

/// Whether `digits` (values 0–9, most significant first) pass the Luhn check.
pub(super) fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let d2 = d * 2;
                if d2 > 9 {
                    d2 - 9
                } else {
                    d2
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Where the card number in the DFA's candidate `hay[start..end]` ends: the
/// longest prefix of 13 or more of its digits that ends at a word boundary
/// and passes Luhn, or `None` (the candidate is emitted unchanged).
///
/// A shorter prefix is tried because the candidate is greedy: in
/// "4111 1111 1111 1111 12/25" it takes all 18 digits, which fail Luhn,
/// while the first 16 are the card.
pub(super) fn card_end(hay: &[u8], start: usize, end: usize) -> Option<usize> {
    let mut digits = [0u8; 19];
    let mut ends = [0usize; 19];
    let mut n = 0;
    for (i, &b) in hay[start..end].iter().enumerate() {
        if b.is_ascii_digit() && n < digits.len() {
            digits[n] = b - b'0';
            ends[n] = start + i + 1;
            n += 1;
        }
    }
    (13..=n)
        .rev()
        .find(|&k| (k == n || !hay[ends[k - 1]].is_ascii_digit()) && luhn(&digits[..k]))
        .map(|k| ends[k - 1])
}
