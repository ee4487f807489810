//! The redactor: any text, split into tokens anywhere, gives exactly what
//! the whole text gives, and holds back no more than its bound.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use sluice::redact::Redactor;
use sluice::stream::Stage;

fn redactor() -> Arc<Redactor> {
    static R: OnceLock<Arc<Redactor>> = OnceLock::new();
    R.get_or_init(|| {
        Arc::new(
            Redactor::new(&["secret-[0-9]{4}".to_string()], true, "[X]", None)
                .expect("the rules compile"),
        )
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let cuts: Vec<usize> = data[..2].iter().map(|b| *b as usize).collect();
    let text = String::from_utf8_lossy(&data[2..]).into_owned();
    let r = redactor();
    let whole = r.redact(&text);
    let mut stage = r.stage();
    let mut out = String::new();
    let mut rest = text.as_str();
    for c in cuts.iter().cycle().take(64) {
        if rest.is_empty() {
            break;
        }
        let mut at = (c + 1).min(rest.len());
        while !rest.is_char_boundary(at) {
            at += 1;
        }
        let (piece, tail) = rest.split_at(at);
        stage.text(piece, &mut |t| out.push_str(t));
        assert!(stage.held() <= r.max_hold(), "held {} > {}", stage.held(), r.max_hold());
        rest = tail;
    }
    if !rest.is_empty() {
        stage.text(rest, &mut |t| out.push_str(t));
    }
    stage.flush(&mut |t| out.push_str(t));
    assert_eq!(out, whole);
});
