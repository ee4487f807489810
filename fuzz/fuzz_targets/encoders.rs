//! Every streaming encoder, given any text: each event it writes is one
//! SSE event (ends with a blank line and contains no other), and its data
//! is JSON that gives the text back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::encode::{ChunkFormat, Encoder, NativeSse, OpenAiSse};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut encoders: Vec<Box<dyn Encoder>> = vec![
        Box::new(NativeSse),
        Box::new(OpenAiSse(ChunkFormat::new("f", "m", 0, false))),
    ];
    for (i, e) in encoders.iter_mut().enumerate() {
        let mut buf = Vec::new();
        e.token(&mut buf, None, &text);
        let s = std::str::from_utf8(&buf).expect("encoders write UTF-8");
        assert!(s.ends_with("\n\n"));
        assert_eq!(s.matches("\n\n").count(), 1, "one event: {s:?}");
        let data = s
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .expect("a data line");
        let v: serde_json::Value = serde_json::from_str(data).expect("JSON data");
        let got = if i == 0 {
            v["t"].as_str()
        } else {
            v["choices"][0]["delta"]["content"].as_str()
        };
        assert_eq!(got, Some(&*text));
    }
});
