//! Table tests per rule, pacing and refusal tests, and property tests of
//! the streaming guarantee against an independent reference.

use super::*;

use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, RngSeed};
use regex_automata::{meta, Input};

const R: &str = "[REDACTED]";

fn builtins() -> Arc<Redactor> {
    Arc::new(Redactor::new(&[], true, R, None).unwrap())
}

fn custom(patterns: &[&str], builtin: bool, max_hold: Option<usize>) -> Arc<Redactor> {
    let p: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
    Arc::new(Redactor::new(&p, builtin, R, max_hold).unwrap())
}

fn refused(patterns: &[&str], builtin: bool, max_hold: Option<usize>) -> String {
    let p: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
    Redactor::new(&p, builtin, R, max_hold).unwrap_err()
}

/// Runs `pieces` through a fresh stage, then flushes: what the client sees,
/// and the bytes held after each piece.
fn stream(r: &Arc<Redactor>, pieces: &[&str]) -> (String, Vec<usize>) {
    let mut st = r.stage();
    let mut out = String::new();
    let mut held = Vec::new();
    for p in pieces {
        st.text(p, &mut |t| out.push_str(t));
        held.push(st.held());
    }
    st.flush(&mut |t| out.push_str(t));
    assert_eq!(st.held(), 0);
    (out, held)
}

const JWT: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";

#[test]
fn builtin_rules_redact_their_shapes_and_leave_near_misses() {
    let r = builtins();
    let key48 = format!("sk-{}", "aB3d".repeat(12));
    let proj = format!("sk-proj-{}", "Ab_9-x".repeat(20));
    let ghp = format!("ghp_{}", "a1B2".repeat(9));
    let pat = format!("github_pat_11ABCDEFG0_{}", "x9".repeat(30));
    // (input, expected output, the rule it counts under)
    let cases: Vec<(String, String, Option<&str>)> = vec![
        (
            "mail me@example.com now".into(),
            format!("mail {R} now"),
            Some("email"),
        ),
        (
            "first.last+tag@mail.example.co.uk".into(),
            R.into(),
            Some("email"),
        ),
        ("(_ops@corp.io)".into(), format!("({R})"), Some("email")),
        ("me@localhost".into(), "me@localhost".into(), None),
        ("@example.com a@b".into(), "@example.com a@b".into(), None),
        (
            "card 4111 1111 1111 1111.".into(),
            format!("card {R}."),
            Some("card"),
        ),
        ("4111-1111-1111-1111".into(), R.into(), Some("card")),
        ("4111111111111111".into(), R.into(), Some("card")),
        (
            "amex 378282246310005".into(),
            format!("amex {R}"),
            Some("card"),
        ),
        (
            "4111 1111 1111 1112".into(),
            "4111 1111 1111 1112".into(),
            None,
        ),
        ("1234567890123".into(), "1234567890123".into(), None),
        (
            "41111111111111111111".into(),
            "41111111111111111111".into(),
            None,
        ),
        ("x4111111111111111".into(), "x4111111111111111".into(), None),
        (
            "4111 1111 1111 1111 12/25".into(),
            format!("{R} 12/25"),
            Some("card"),
        ),
        (
            "1234 4111 1111 1111 1111".into(),
            format!("1234 {R}"),
            Some("card"),
        ),
        (
            format!("key={key48};"),
            format!("key={R};"),
            Some("openai_key"),
        ),
        (
            format!("\"{proj}\""),
            format!("\"{R}\""),
            Some("openai_key"),
        ),
        (
            "sk-learn-is-a-long-hyphenated-name".into(),
            "sk-learn-is-a-long-hyphenated-name".into(),
            None,
        ),
        ("sk-short1234".into(), "sk-short1234".into(), None),
        (format!("a{key48}"), format!("a{key48}"), None),
        (
            "id AKIAIOSFODNN7EXAMPLE.".into(),
            format!("id {R}."),
            Some("aws_access_key"),
        ),
        (
            "ASIAY34FZKBOKMUTVV7A".into(),
            R.into(),
            Some("aws_access_key"),
        ),
        (
            "AKIAIOSFODNN7EXAMPL".into(),
            "AKIAIOSFODNN7EXAMPL".into(),
            None,
        ),
        (
            format!("token {ghp}"),
            format!("token {R}"),
            Some("github_token"),
        ),
        (pat.clone(), R.into(), Some("github_token")),
        ("ghp_short".into(), "ghp_short".into(), None),
        (
            "xoxb-123456789012-abcdefABCDEF".into(),
            R.into(),
            Some("slack_token"),
        ),
        (
            "xoxz-123456789012-abcdefABCDEF".into(),
            "xoxz-123456789012-abcdefABCDEF".into(),
            None,
        ),
        (format!("Bearer {JWT}"), format!("Bearer {R}"), Some("jwt")),
        (
            "eyJhbGciOiJIUzI1NiJ9".into(),
            "eyJhbGciOiJIUzI1NiJ9".into(),
            None,
        ),
        (
            "plain words, héllo wörld 日本語 2024.".into(),
            "plain words, héllo wörld 日本語 2024.".into(),
            None,
        ),
    ];
    for (input, want, rule) in cases {
        let before: Vec<u64> = BUILTIN_RULES.iter().map(|l| r.count(l)).collect();
        assert_eq!(r.redact(&input), want, "{input}");
        for (i, label) in BUILTIN_RULES.iter().enumerate() {
            let added = r.count(label) - before[i];
            let expect = u64::from(rule == Some(*label));
            assert_eq!(added, expect, "{input}: counted under {label}");
        }
    }
}

#[test]
fn an_empty_rule_set_passes_text_through() {
    let r = custom(&[], false, None);
    assert_eq!(r.max_hold(), 0);
    assert_eq!(
        stream(&r, &["me@x.io ", "4111111111111111"]),
        ("me@x.io 4111111111111111".into(), vec![0, 0])
    );
}

#[test]
fn the_rule_set_is_shared_across_threads() {
    fn shared<T: Send + Sync>() {}
    shared::<Redactor>();
    let r = builtins();
    let out: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| s.spawn(|| stream(&r, &["mail me", "@x.io now"]).0))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(out, [format!("mail {R} now"), format!("mail {R} now")]);
}

#[test]
fn an_address_whose_local_part_looks_like_a_key_is_redacted_whole() {
    let r = builtins();
    let key = format!("sk-{}", "a1".repeat(12));
    assert_eq!(r.redact(&format!("{key}@example.com")), R);
    assert_eq!(r.count("email"), 1);
    assert_eq!(r.count("openai_key"), 0);
}

#[test]
fn luhn_and_card_candidates() {
    for (digits, ok) in [
        ("4111111111111111", true),
        ("4111111111111112", false),
        ("79927398713", true),
        ("79927398710", false),
        ("378282246310005", true),
        ("6011111111111117", true),
        ("0000000000000", true),
    ] {
        let d: Vec<u8> = digits.bytes().map(|b| b - b'0').collect();
        assert_eq!(rules::luhn(&d), ok, "{digits}");
    }
    let hay = b"4111 1111 1111 1111 12/25";
    assert_eq!(rules::card_end(hay, 0, 22), Some(19));
    assert_eq!(rules::card_end(b"4111 1111 1111 1112", 0, 19), None);
}

#[test]
fn the_replacement_is_configurable_even_empty() {
    let p = vec!["secret[0-9]{2}".to_string()];
    let r = Redactor::new(&p, false, "***", None).unwrap();
    assert_eq!(r.redact("a secret42 b secret7"), "a *** b secret7");
    let r = Redactor::new(&p, false, "", None).unwrap();
    assert_eq!(r.redact("a secret42 b"), "a  b");
    assert_eq!(r.count("custom_1"), 1);
}

#[test]
fn custom_rules_are_labelled_in_order_and_counted() {
    let r = custom(&["alpha[0-9]", "beta[0-9]"], false, None);
    assert_eq!(r.labels().collect::<Vec<_>>(), ["custom_1", "custom_2"]);
    assert_eq!(r.redact("beta1 alpha2 beta3"), format!("{R} {R} {R}"));
    assert_eq!((r.count("custom_1"), r.count("custom_2")), (1, 2));
}

#[test]
fn with_key_prefix_rules_ordinary_words_are_emitted_at_once() {
    let r = custom(
        &[r"\bsk-[A-Za-z0-9]{20,64}", r"\bghp_[A-Za-z0-9]{36}"],
        false,
        None,
    );
    let words = [
        "The", " quick", " brown", " fox", " asks", " about", " tasks", " skies", ",", " 2024",
        " héllo", "!", "\n", " ghosts",
    ];
    let mut st = r.stage();
    for w in words {
        let mut got = Vec::new();
        st.text(w, &mut |t| {
            // Passed on as it came: the same bytes, not a copy.
            assert_eq!(t.as_ptr(), w.as_ptr());
            got.push(t.to_string());
        });
        assert_eq!(got, [w], "{w:?} is passed on in the same call");
        assert_eq!(st.held(), 0, "{w:?}");
    }
}

#[test]
fn with_the_email_rule_a_word_waits_only_for_the_next_character() {
    let r = builtins();
    let mut st = r.stage();
    let mut out = String::new();
    st.text("Hello", &mut |t| out.push_str(t));
    assert_eq!((out.as_str(), st.held()), ("", 5));
    st.text(",", &mut |t| out.push_str(t));
    assert_eq!((out.as_str(), st.held()), ("Hello,", 0));
    st.text(" wor", &mut |t| out.push_str(t));
    assert_eq!((out.as_str(), st.held()), ("Hello, ", 3));
    st.text("ld", &mut |t| out.push_str(t));
    assert_eq!(st.held(), 5);
    st.text(" me@x.io", &mut |t| out.push_str(t));
    assert_eq!(out, "Hello, world ");
    // The address is complete only once a character that cannot extend it
    // arrives; then it goes at once, not a byte later.
    st.text(" ", &mut |t| out.push_str(t));
    assert_eq!((out.as_str(), st.held()), ("Hello, world [REDACTED] ", 0));
    st.text("bye", &mut |t| out.push_str(t));
    st.flush(&mut |t| out.push_str(t));
    assert_eq!(out, "Hello, world [REDACTED] bye");
}

#[test]
fn a_secret_split_into_single_characters_is_caught() {
    let r = builtins();
    let text = format!("a {JWT} b me@example.org c sk-{} d", "Zz9".repeat(10));
    let pieces: Vec<String> = text.chars().map(String::from).collect();
    let pieces: Vec<&str> = pieces.iter().map(|s| s.as_str()).collect();
    let (out, held) = stream(&r, &pieces);
    assert_eq!(out, format!("a {R} b {R} c {R} d"));
    assert!(held.iter().all(|&h| h <= r.max_hold()));
}

#[test]
fn held_text_is_flushed_at_the_end() {
    let r = builtins();
    assert_eq!(stream(&r, &["the end"]), ("the end".into(), vec![3]));
    assert_eq!(
        stream(&r, &["card ", "4111111111111111"]).0,
        format!("card {R}")
    );
    // `$` can only be decided at the end.
    let r = custom(&["tail$"], false, None);
    let (out, held) = stream(&r, &["a tail", " b tail"]);
    assert_eq!(out, format!("a tail b {R}"));
    assert_eq!(held, [4, 4]);
}

#[test]
fn anchors_and_word_boundaries_see_the_whole_text() {
    let r = custom(&["^secret", r"\bkey\b"], false, None);
    for split in 0..=12 {
        let text = "secret secret key é key keys";
        let (a, b) = text.split_at(split.min(text.len()));
        if !text.is_char_boundary(a.len()) {
            continue;
        }
        assert_eq!(stream(&r, &[a, b]).0, format!("{R} secret {R} é {R} keys"));
    }
}

#[test]
fn an_unbounded_pattern_is_refused_with_a_bounded_rewrite() {
    assert_eq!(
        refused(&["a.*b"], false, None),
        "--redact 'a.*b': matches can be unbounded (.*); bound it, e.g. a.{0,64}b, or set --redact-max-hold"
    );
    assert_eq!(
        refused(&["x", "tok_[a-z]+?(-[0-9]{3,})?"], false, None),
        "--redact 'tok_[a-z]+?(-[0-9]{3,})?': matches can be unbounded ([a-z]+?, [0-9]{3,}); bound it, e.g. tok_[a-z]{1,65}?(-[0-9]{3,67})?, or set --redact-max-hold"
    );
    let e = refused(&["a(b"], false, None);
    assert!(e.starts_with("--redact 'a(b': not a valid regex:"), "{e}");
    assert_eq!(
        refused(&["a?"], false, None),
        "--redact 'a?': can match empty text; a rule must match at least one character"
    );
    let many: Vec<&str> = vec!["x"; MAX_CUSTOM_RULES + 1];
    assert!(refused(&many, false, None).contains("at most 16 patterns"));
    assert_eq!(
        refused(&["a"], false, Some(0)),
        "--redact-max-hold must be at least 1 byte"
    );
    assert_eq!(
        refused(&[], true, Some(10)),
        "--redact-max-hold 10 is shorter than the shortest match of --redact-builtin (jwt) (24 bytes): it could never be redacted"
    );
}

#[test]
fn max_hold_caps_an_unbounded_match_and_the_rest_leaks() {
    let r = custom(&["sk-[a-z]+"], false, Some(8));
    assert_eq!(r.max_hold(), 8);
    let (out, held) = stream(&r, &["x sk-", "abcdefghij", " y"]);
    assert_eq!(out, format!("x {R}fghij y"));
    assert!(held.iter().all(|&h| h <= 8), "{held:?}");
    assert_eq!(r.redact("sk-abc sk-abcdefgh"), format!("{R} {R}fgh"));
    // The cap applies to every rule, and only when it is the smaller bound.
    assert_eq!(custom(&["a{1,4}"], false, Some(100)).max_hold(), 4);
    assert_eq!(builtins().max_hold(), 6152);
}

#[test]
fn metrics_render_the_configured_rules() {
    let metrics = Arc::new(Metrics::default());
    let r = Redactor::new(&["zz[0-9]".to_string()], true, R, None)
        .unwrap()
        .count_into(Arc::clone(&metrics));
    r.redact("zz1 me@x.io zz2");
    let text = metrics.render(false);
    assert!(
        text.contains("# TYPE sluice_redactions_total counter\n"),
        "{text}"
    );
    assert!(text.contains("sluice_redactions_total{rule=\"email\"} 1\n"));
    assert!(text.contains("sluice_redactions_total{rule=\"jwt\"} 0\n"));
    assert!(text.contains("sluice_redactions_total{rule=\"custom_1\"} 2\n"));
    assert!(!text.contains("custom_2"));
    let om = metrics.render(true);
    assert!(om.contains("# TYPE sluice_redactions counter\n"), "{om}");
    assert!(om.contains("sluice_redactions_total{rule=\"custom_1\"} 2\n"));
    assert!(!Metrics::default().render(false).contains("redactions"));
}

// ---- property tests ----

/// The same rules as a [`Redactor`], searched by regex-automata's meta
/// engine one position at a time over the whole text: an independent
/// statement of the semantics in the module docs (leftmost-first, card
/// last with Luhn, the `max_hold` cap).
struct Reference {
    re: meta::Regex,
    luhn: Vec<bool>,
    cap: usize,
}

impl Reference {
    fn new(patterns: &[&str], builtin: bool, max_hold: Option<usize>) -> Reference {
        let mut hirs = Vec::new();
        let mut luhn = Vec::new();
        let mut add = |p: &str, card: bool| {
            hirs.push(rules::parse("t", p, max_hold.is_some()).unwrap().hir);
            luhn.push(card);
        };
        if builtin {
            rules::BUILTIN_PATTERNS
                .iter()
                .for_each(|(_, p)| add(p, false));
        }
        patterns.iter().for_each(|p| add(p, false));
        if builtin {
            add(rules::CARD_PATTERN, true);
        }
        let re = meta::Regex::builder()
            .configure(meta::Config::new().match_kind(MatchKind::LeftmostFirst))
            .build_many_from_hir(&hirs)
            .unwrap();
        let cap = custom(patterns, builtin, max_hold).max_hold();
        Reference { re, luhn, cap }
    }

    fn redact(&self, text: &str) -> String {
        let (mut out, mut done, mut s) = (String::new(), 0, 0);
        while s < text.len() {
            let stop = text.len().min(s + self.cap);
            let input = Input::new(text).span(s..stop).anchored(Anchored::Yes);
            let end = self.re.search(&input).and_then(|m| {
                if self.luhn[m.pattern().as_usize()] {
                    rules::card_end(text.as_bytes(), s, m.end())
                } else {
                    Some(m.end())
                }
            });
            match end {
                Some(end) => {
                    out.push_str(&text[done..s]);
                    out.push_str(R);
                    (done, s) = (end, end);
                }
                None => s += 1,
            }
        }
        out.push_str(&text[done..]);
        out
    }
}

fn chars_of(set: &'static str, len: std::ops::RangeInclusive<usize>) -> BoxedStrategy<String> {
    let set: Vec<char> = set.chars().collect();
    proptest::collection::vec(proptest::sample::select(set), len)
        .prop_map(|v| v.into_iter().collect())
        .boxed()
}

const ALNUM: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const B64URL: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-";

fn card() -> BoxedStrategy<String> {
    (
        chars_of("0123456789", 15..=15),
        proptest::sample::select(vec!["", " ", "-"]),
    )
        .prop_map(|(body, sep)| {
            let mut d: Vec<u8> = body.bytes().map(|b| b - b'0').collect();
            d.push(0);
            let check = (0..10).find(|&c| {
                d[15] = c;
                rules::luhn(&d)
            });
            d[15] = check.unwrap();
            let digits: Vec<String> = d.iter().map(|x| x.to_string()).collect();
            digits
                .chunks(4)
                .map(|c| c.concat())
                .collect::<Vec<_>>()
                .join(sep)
        })
        .boxed()
}

/// A secret of one of the builtin shapes.
fn secret() -> BoxedStrategy<String> {
    prop_oneof![
        (
            chars_of("abc.xyz_+-019", 0..=8),
            chars_of("abcdef", 1..=6),
            proptest::sample::select(vec!["io", "com", "co.uk"])
        )
            .prop_map(|(l, d, t)| format!("a{l}@{d}.{t}")),
        card(),
        chars_of(ALNUM, 20..=64).prop_map(|k| format!("sk-{k}")),
        chars_of(B64URL, 20..=80).prop_map(|k| format!("sk-proj-{k}")),
        chars_of("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", 16..=16).prop_map(|k| format!("AKIA{k}")),
        chars_of(ALNUM, 36..=40).prop_map(|k| format!("ghp_{k}")),
        chars_of(ALNUM, 10..=30).prop_map(|k| format!("xoxb-{k}")),
        (
            chars_of(B64URL, 8..=20),
            chars_of(B64URL, 8..=30),
            chars_of(B64URL, 0..=20)
        )
            .prop_map(|(h, p, s)| format!("eyJ{h}.eyJ{p}.{s}")),
    ]
    .boxed()
}

/// A word, or a near miss that shares a secret's first characters.
fn word() -> BoxedStrategy<String> {
    prop_oneof![
        4 => chars_of("abcdefghijklmnopqrstuvwxyz", 1..=8),
        1 => proptest::sample::select(vec![
            "sk", "sk-", "sk-proj", "ask", "AKIA", "ASIAN", "eyJ", "eyJhb.", "xoxb-", "ghp_", "github_pat_",
            "4111", "1234 5678", "2024", "12/25", "@", "a@", "a@b", "e.g.", "héllo", "日本語", "é", "x.y",
            "secret", "zz9", "-", "_",
        ])
        .prop_map(String::from),
        1 => chars_of("0123456789", 1..=20),
    ]
    .boxed()
}

/// A text of words and secrets with varied separators, and where to cut it.
fn text_and_cuts() -> impl Strategy<Value = (String, Vec<usize>)> {
    let piece = prop_oneof![3 => word(), 1 => secret()];
    let sep = prop_oneof![4 => Just(" "), 1 => Just(""), 1 => Just(", "), 1 => Just("\n"), 1 => Just(".")];
    let text = proptest::collection::vec((piece, sep), 0..24)
        .prop_map(|v| v.into_iter().map(|(p, s)| p + s).collect::<String>());
    let cuts = proptest::collection::vec(any::<proptest::sample::Index>(), 0..16);
    (text, cuts).prop_map(|(text, cuts)| {
        let mut at: Vec<usize> = cuts
            .iter()
            .map(|i| {
                let mut p = i.index(text.len() + 1);
                while !text.is_char_boundary(p) {
                    p -= 1;
                }
                p
            })
            .collect();
        at.sort_unstable();
        (text, at)
    })
}

fn split<'a>(text: &'a str, cuts: &[usize]) -> Vec<&'a str> {
    let mut pieces = Vec::new();
    let mut from = 0;
    for &c in cuts.iter().chain([&text.len()]) {
        pieces.push(&text[from..c]);
        from = c;
    }
    pieces
}

fn prop_config() -> PropConfig {
    PropConfig {
        cases: 256,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x5_11CE),
        ..PropConfig::default()
    }
}

const CUSTOM: [&str; 2] = [r"secret-?[0-9]{1,4}", r"\bzz[0-9]\b"];
const CAPPED: [&str; 2] = [r"sk-[A-Za-z0-9]+", r"[a-z]+@[a-z.]+"];

/// Built once for all cases: compiling the builtins is the slow part.
fn full() -> &'static (Arc<Redactor>, Reference) {
    static SET: std::sync::OnceLock<(Arc<Redactor>, Reference)> = std::sync::OnceLock::new();
    SET.get_or_init(|| {
        (
            custom(&CUSTOM, true, None),
            Reference::new(&CUSTOM, true, None),
        )
    })
}

fn capped() -> &'static (Arc<Redactor>, Reference) {
    static SET: std::sync::OnceLock<(Arc<Redactor>, Reference)> = std::sync::OnceLock::new();
    SET.get_or_init(|| {
        (
            custom(&CAPPED, false, Some(24)),
            Reference::new(&CAPPED, false, Some(24)),
        )
    })
}

proptest! {
    #![proptest_config(prop_config())]

    #[test]
    fn any_split_gives_the_whole_texts_output((text, cuts) in text_and_cuts()) {
        let (r, reference) = full();
        let whole = r.redact(&text);
        prop_assert_eq!(&whole, &reference.redact(&text));
        let (out, held) = stream(r, &split(&text, &cuts));
        prop_assert_eq!(&out, &whole);
        prop_assert!(held.iter().all(|&h| h <= r.max_hold()), "{:?}", held);
    }

    #[test]
    fn with_a_cap_any_split_still_agrees((text, cuts) in text_and_cuts()) {
        let (r, reference) = capped();
        let whole = r.redact(&text);
        prop_assert_eq!(&whole, &reference.redact(&text));
        let (out, held) = stream(r, &split(&text, &cuts));
        prop_assert_eq!(&out, &whole);
        prop_assert!(held.iter().all(|&h| h <= 24), "{:?}", held);
    }

    #[test]
    fn a_secret_between_spaces_never_reaches_the_client(
        parts in proptest::collection::vec(
            prop_oneof![chars_of("abcdefghijklmnopqrstuvwxyz", 1..=8).prop_map(|w| (w, false)),
                        secret().prop_map(|s| (s, true))],
            1..12),
        cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..16),
    ) {
        let text = parts.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>().join(" ");
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(text.len() + 1)).collect();
        at.sort_unstable();
        let (r, _) = full();
        let (out, _) = stream(r, &split(&text, &at));
        for (p, is_secret) in &parts {
            if *is_secret {
                prop_assert!(!out.contains(p.as_str()), "{} leaked in {}", p, out);
            }
        }
    }
}
