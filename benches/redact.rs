//! Criterion benches of the redaction stage: what one token costs on
//! ordinary text with the builtin rules (the e-mail rule holds each word
//! until the next token), with rules no ordinary word can start (text
//! passes through uncopied), a secret arriving in small tokens, and whole
//! texts redacted at once.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice::redact::{RedactStage, Redactor};
use sluice::stream::Stage;

const PROSE: &str = "The quick brown fox jumps over the lazy dog, and then it runs \
    back into the forest where nobody can see it again until the next morning. ";

const JWT: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";

fn redactor(patterns: &[&str], builtin: bool) -> Arc<Redactor> {
    let p: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
    Arc::new(Redactor::new(&p, builtin, "[REDACTED]", None).unwrap())
}

/// Feeds `token` to `stage` and passes on what comes out.
fn feed(stage: &mut RedactStage, token: &str) {
    stage.text(black_box(token), &mut |t| {
        black_box(t);
    });
}

fn per_token(c: &mut Criterion) {
    let mut g = c.benchmark_group("redact");
    g.throughput(Throughput::Elements(1));
    let builtin = redactor(&[], true);
    let mut stage = builtin.stage();
    g.bench_function("token_the_builtin", |b| b.iter(|| feed(&mut stage, " the")));
    let keys = redactor(&[r"\bsk-[A-Za-z0-9]{20,64}", r"\bAKIA[A-Z0-9]{16}"], false);
    let mut stage = keys.stage();
    g.bench_function("token_the_no_match_possible", |b| {
        b.iter(|| feed(&mut stage, " the"))
    });
    let tokens: Vec<&str> = PROSE.split_inclusive(' ').collect();
    let mut stage = builtin.stage();
    g.throughput(Throughput::Elements(tokens.len() as u64));
    g.bench_function("prose_tokens_builtin", |b| {
        b.iter(|| {
            for t in &tokens {
                feed(&mut stage, t);
            }
        })
    });
    // A JWT in 4-byte tokens, then a space: held throughout, then replaced.
    let jwt: Vec<&str> = JWT
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap())
        .chain([" "])
        .collect();
    g.throughput(Throughput::Elements(jwt.len() as u64));
    g.bench_function("jwt_in_4_byte_tokens", |b| {
        b.iter(|| {
            let mut stage = builtin.stage();
            for t in &jwt {
                feed(&mut stage, t);
            }
        })
    });
    g.finish();
}

fn whole(c: &mut Criterion) {
    let mut g = c.benchmark_group("redact");
    let builtin = redactor(&[], true);
    let text = PROSE.repeat(16);
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("whole_prose_builtin", |b| {
        b.iter(|| black_box(builtin.redact(black_box(&text))))
    });
    let mixed = format!(
        "{PROSE}mail me@example.com, key sk-{} {JWT} ",
        "aB3d".repeat(12)
    )
    .repeat(8);
    g.throughput(Throughput::Bytes(mixed.len() as u64));
    g.bench_function("whole_with_secrets_builtin", |b| {
        b.iter(|| black_box(builtin.redact(black_box(&mixed))))
    });
    g.bench_function("build_builtin", |b| {
        b.iter(|| black_box(Redactor::new(&[], true, "[REDACTED]", None).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, per_token, whole);
criterion_main!(benches);
