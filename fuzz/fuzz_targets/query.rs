//! The query-string decoder and the native GET request built from it:
//! never a panic, and every decoded pair is valid UTF-8 text.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(q) = std::str::from_utf8(data) else {
        return;
    };
    for (k, v) in sluice::http::parse_query(q) {
        assert!(!k.contains('&') || q.contains("%26"));
        let _ = (k.len(), v.len());
    }
    let _ = sluice::api::parse_query_request(Some(q), 4096);
});
