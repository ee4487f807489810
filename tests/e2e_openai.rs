//! End to end: the OpenAI-compatible face. `POST /v1/chat/completions`
//! streamed (`chat.completion.chunk` events, `[DONE]`), answered whole
//! (`chat.completion`), under `--no-streaming`, refused before the stream and
//! failing during it (OpenAI's error shape), its heartbeats (SSE comments),
//! unknown fields, cancellation on disconnect; `GET /v1/models`, CORS and
//! the demo page at `GET /`.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use support::fake_upstream::{error_body, token_text, FakeUpstream, Script};
use support::*;

const FAST: &[&str] = &["--sim-ttft-ms", "0", "--sim-itl-ms", "1"];
const WAIT: Duration = Duration::from_secs(3);
const CHAT: &str = "/v1/chat/completions";

fn fast_with(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = FAST.to_vec();
    v.extend_from_slice(extra);
    v
}

/// `POST /v1/chat/completions` with `body` and `extra` header lines.
fn chat_with(body: &Value, extra: &str) -> Vec<u8> {
    post(CHAT, &body.to_string(), extra)
}

fn chat(body: &Value) -> Vec<u8> {
    chat_with(body, "")
}

fn story() -> Value {
    json!([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "tell me a story"}
    ])
}

/// The text the native endpoint streams for `messages`.
fn native_text(srv: &TestServer, messages: &Value, max_tokens: u32) -> String {
    let body = json!({"messages": messages, "max_tokens": max_tokens});
    let (_, events) = stream_events(srv.addr, &post_stream(&body.to_string()));
    tokens_until_done(&events).concat()
}

/// The `data:` payloads of an SSE body, in order (comments skipped).
fn datas(body: &[u8]) -> Vec<String> {
    parse_sse(body)
        .into_iter()
        .map(|e| {
            assert_eq!(e.event, "message", "OpenAI streams name no events: {e:?}");
            e.data
        })
        .collect()
}

fn parse(data: &str) -> Value {
    serde_json::from_str(data).unwrap_or_else(|e| panic!("data is not JSON ({e}): {data:?}"))
}

fn gauge(g: &std::sync::atomic::AtomicI64) -> i64 {
    g.load(std::sync::atomic::Ordering::SeqCst)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Asserts OpenAI's error shape and returns `(type, code)`.
fn openai_error(r: &Response) -> (String, String) {
    assert_eq!(
        r.head.header("content-type"),
        Some("application/json"),
        "{:?}",
        r.head
    );
    error_object(&r.json())
}

fn error_object(v: &Value) -> (String, String) {
    let err = v
        .get("error")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("no error object in {v}"));
    let msg = err.get("message").and_then(Value::as_str);
    assert!(msg.is_some_and(|m| !m.is_empty()), "no message in {v}");
    let kind = err.get("type").and_then(Value::as_str);
    let code = err.get("code").and_then(Value::as_str);
    (
        kind.unwrap_or_else(|| panic!("no type in {v}")).to_owned(),
        code.unwrap_or_else(|| panic!("no code in {v}")).to_owned(),
    )
}

fn cors_headers(head: &Head) -> Vec<(String, String)> {
    head.headers
        .iter()
        .filter(|(n, _)| n.starts_with("access-control-"))
        .cloned()
        .collect()
}

/// A streamed chat completion, checked chunk by chunk.
struct Streamed {
    chunks: Vec<Value>,
    /// The concatenated content deltas.
    text: String,
    finish_reason: String,
    usage: Option<Value>,
}

/// Checks the chunk sequence of a successful stream: role chunk, content
/// deltas, the finish chunk, the usage chunk (when `usage`), `[DONE]` last.
fn check_stream(body: &[u8], model: &str, usage: bool) -> Streamed {
    let datas = datas(body);
    let (last, rest) = datas.split_last().expect("some events");
    assert_eq!(last, "[DONE]", "last data event: {datas:?}");
    assert!(!rest.iter().any(|d| d == "[DONE]"), "one [DONE]: {datas:?}");
    let chunks: Vec<Value> = rest.iter().map(|d| parse(d)).collect();
    let first = &chunks[0];
    let id = first["id"].as_str().expect("id").to_owned();
    assert!(id.starts_with("chatcmpl-") && id.len() > 9, "{first}");
    let created = first["created"].as_u64().expect("created");
    assert!(created.abs_diff(now_secs()) < 60, "{first}");
    for c in &chunks {
        assert_eq!(c["id"], id, "same id everywhere: {c}");
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        assert_eq!(c["created"], created, "{c}");
        assert_eq!(c["model"], model, "{c}");
    }
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant", "{first}");
    assert_eq!(first["choices"][0]["index"], 0, "{first}");
    assert!(first["choices"][0]["finish_reason"].is_null(), "{first}");

    let (chunks_wo_usage, usage_chunk) = if usage {
        let (u, before) = chunks.split_last().unwrap();
        assert_eq!(u["choices"], json!([]), "usage chunk: {u}");
        (before, Some(u["usage"].clone()))
    } else {
        (&chunks[..], None)
    };
    let (fin, middle) = chunks_wo_usage.split_last().unwrap();
    let finish_reason = fin["choices"][0]["finish_reason"]
        .as_str()
        .unwrap_or_else(|| panic!("no finish_reason in {fin}"))
        .to_owned();
    assert_eq!(fin["choices"].as_array().map(Vec::len), Some(1), "{fin}");
    assert!(
        fin["choices"][0]["delta"]
            .get("content")
            .is_none_or(|c| c.as_str() == Some("")),
        "the finish chunk adds no text: {fin}"
    );
    let mut text = String::new();
    for (i, c) in middle.iter().enumerate() {
        let choice = &c["choices"][0];
        assert!(choice["finish_reason"].is_null(), "{c}");
        if i > 0 {
            assert!(
                choice["delta"].get("role").is_none(),
                "role only first: {c}"
            );
            let t = choice["delta"]["content"].as_str().expect("content");
            assert!(!t.is_empty(), "no empty content deltas: {c}");
        }
        text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
    }
    if !usage {
        assert!(
            chunks
                .iter()
                .all(|c| c.get("usage").is_none_or(Value::is_null)),
            "no usage unless asked for"
        );
    }
    Streamed {
        chunks,
        text,
        finish_reason,
        usage: usage_chunk,
    }
}

// ------------------------------------------------------------------ streaming

#[test]
fn stream_true_gives_role_content_finish_usage_and_done() {
    let srv = start(FAST);
    let messages = story();
    let expected = native_text(&srv, &messages, 5);
    assert!(!expected.is_empty());

    let mut c = srv.connect();
    c.send(&chat(&json!({
        "model": "my-model",
        "messages": messages,
        "max_tokens": 5,
        "stream": true,
        "stream_options": {"include_usage": true}
    })));
    let head = c.read_head();
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert_eq!(head.header("cache-control"), Some("no-cache"));
    assert!(head.is_chunked(), "{head:?}");
    assert!(head.header("x-request-id").is_some(), "{head:?}");
    let body = c.read_body(&head);
    let s = check_stream(&body, "my-model", true);
    assert_eq!(s.text, expected, "same text as the native endpoint");
    // role + 5 content deltas + finish + usage.
    assert_eq!(s.chunks.len(), 8, "{:?}", s.chunks);
    assert_eq!(s.finish_reason, "length", "max_tokens 5 < --sim-tokens 64");
    let u = s.usage.unwrap();
    assert_eq!(
        u,
        json!({"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11}),
        "{u}"
    );

    // The connection carries the next request.
    let r = c.roundtrip(&get("/healthz", ""));
    assert_eq!(r.status(), 200);
    eventually(&srv.metrics, WAIT, "2 streams completed", || {
        load(&srv.metrics.streams_completed) == 2 && gauge(&srv.metrics.streams_open) == 0
    });
}

#[test]
fn stream_without_include_usage_has_no_usage_chunk_and_stop_when_not_cut() {
    let srv = start(&fast_with(&["--sim-tokens", "4"]));
    let messages = json!([{"role": "user", "content": "hi"}]);
    let expected = native_text(&srv, &messages, 10);
    let mut c = srv.connect();
    let r = c.roundtrip(&chat(&json!({
        "model": "m", "messages": messages, "max_tokens": 10, "stream": true
    })));
    assert_eq!(r.status(), 200);
    let s = check_stream(&r.body, "m", false);
    assert_eq!(s.chunks.len(), 1 + 4 + 1, "{:?}", s.chunks);
    assert_eq!(s.text, expected);
    assert_eq!(s.finish_reason, "stop");

    // include_usage false is the same as absent; content given as parts is
    // the same prompt as the plain string.
    let r = c.roundtrip(&chat(&json!({
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 10,
        "stream": true,
        "stream_options": {"include_usage": false}
    })));
    let s = check_stream(&r.body, "m", false);
    assert_eq!(s.text, expected);
}

#[test]
fn stream_false_or_absent_gives_one_chat_completion() {
    let srv = start(FAST);
    let messages = story();
    let expected = native_text(&srv, &messages, 5);
    let mut c = srv.connect();
    for stream in [Some(false), None] {
        let mut body = json!({"model": "my-model", "messages": messages, "max_tokens": 5});
        if let Some(s) = stream {
            body["stream"] = json!(s);
        }
        let r = c.roundtrip(&chat(&body));
        assert_eq!(r.status(), 200, "{}", r.text());
        assert_eq!(r.head.header("content-type"), Some("application/json"));
        assert!(!r.head.is_chunked(), "{:?}", r.head);
        assert_eq!(r.head.content_length(), Some(r.body.len()));
        let v = r.json();
        assert_eq!(v["object"], "chat.completion", "{v}");
        assert!(v["id"].as_str().is_some_and(|i| i.starts_with("chatcmpl-")));
        assert!(v["created"]
            .as_u64()
            .is_some_and(|t| t.abs_diff(now_secs()) < 60));
        assert_eq!(v["model"], "my-model", "{v}");
        let choices = v["choices"].as_array().expect("choices");
        assert_eq!(choices.len(), 1, "{v}");
        assert_eq!(choices[0]["index"], 0, "{v}");
        assert_eq!(choices[0]["message"]["role"], "assistant", "{v}");
        assert_eq!(choices[0]["message"]["content"], expected.as_str(), "{v}");
        assert_eq!(choices[0]["finish_reason"], "length", "{v}");
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11}),
            "{v}"
        );
    }
    // Without a model in the request, the served model's name.
    let r = c.roundtrip(&chat(&json!({"messages": messages, "max_tokens": 2})));
    assert_eq!(r.json()["model"], "sluice-sim", "{}", r.text());
}

// ------------------------------------------------------------ --no-streaming

#[test]
fn no_streaming_gives_the_whole_text_in_one_chunk_then_done() {
    let srv = start(&fast_with(&["--no-streaming"]));
    let messages = story();
    let mut c = srv.connect();

    // The native endpoint answers one JSON document.
    let r = c.roundtrip(&post_stream(
        &json!({"messages": messages, "max_tokens": 5}).to_string(),
    ));
    assert_eq!(r.status(), 200);
    assert_eq!(r.head.header("content-type"), Some("application/json"));
    let native = r.json();
    let expected = native["text"].as_str().expect("text").to_owned();
    assert!(!expected.is_empty(), "{native}");
    assert_eq!(native["finish_reason"], "length", "{native}");
    assert_eq!(native["usage"]["completion_tokens"], 5, "{native}");

    for include_usage in [false, true] {
        let r = c.roundtrip(&chat(&json!({
            "model": "m",
            "messages": messages,
            "max_tokens": 5,
            "stream": true,
            "stream_options": {"include_usage": include_usage}
        })));
        assert_eq!(r.status(), 200);
        assert_eq!(r.head.header("content-type"), Some("text/event-stream"));
        let d = datas(&r.body);
        assert_eq!(d.len(), 2 + include_usage as usize, "{d:?}");
        assert_eq!(d.last().unwrap(), "[DONE]");
        let whole = parse(&d[0]);
        assert_eq!(whole["object"], "chat.completion.chunk", "{whole}");
        assert_eq!(whole["model"], "m", "{whole}");
        let choice = &whole["choices"][0];
        assert_eq!(choice["delta"]["role"], "assistant", "{whole}");
        assert_eq!(choice["delta"]["content"], expected.as_str(), "{whole}");
        assert_eq!(choice["finish_reason"], "length", "{whole}");
        if include_usage {
            let u = parse(&d[1]);
            assert_eq!(u["id"], whole["id"], "{u}");
            assert_eq!(u["choices"], json!([]), "{u}");
            assert_eq!(
                u["usage"],
                json!({"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11}),
                "{u}"
            );
        }
    }

    // stream: false is still one chat.completion.
    let r = c.roundtrip(&chat(&json!({"messages": messages, "max_tokens": 5})));
    let v = r.json();
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], expected.as_str());
}

// ------------------------------------------------------------------ refusals

#[test]
fn bad_requests_are_400_invalid_request_error_and_keep_the_connection() {
    let srv = start(FAST);
    let mut c = srv.connect();
    let bodies = [
        r#"{"messages": [{"role": "user", "content": "hi"}"#.to_owned(),
        "not json at all".to_owned(),
        "[1, 2]".to_owned(),
        json!({"model": "m"}).to_string(),
        json!({"messages": []}).to_string(),
        json!({"messages": "hi"}).to_string(),
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).to_string(),
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}).to_string(),
        json!({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}).to_string(),
        json!({"messages": [{"role": "user", "content": "hi"}], "n": 2}).to_string(),
    ];
    for b in &bodies {
        let r = c.roundtrip(&post(CHAT, b, ""));
        assert_eq!(r.status(), 400, "{b}: {}", r.text());
        assert!(!r.head.closes(), "{b}: the framing was sound: {:?}", r.head);
        let (kind, code) = openai_error(&r);
        assert_eq!(kind, "invalid_request_error", "{b}: {}", r.text());
        assert_eq!(code, "bad_request", "{b}: {}", r.text());
    }
    assert_eq!(load(&srv.metrics.streams_started), 0);
    // Still usable.
    let r = c.roundtrip(&chat(
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    ));
    assert_eq!(r.status(), 200, "{}", r.text());
}

#[test]
fn get_on_chat_completions_is_405_with_allow_post() {
    let srv = start(FAST);
    let mut c = srv.connect();
    let r = c.roundtrip(&get(CHAT, ""));
    assert_eq!(r.status(), 405, "{}", r.text());
    assert_eq!(r.head.header("allow"), Some("POST"));
    let (kind, code) = openai_error(&r);
    assert_eq!(kind, "invalid_request_error");
    assert_eq!(code, "method_not_allowed");

    let r = c.roundtrip(&post("/v1/models", "{}", ""));
    assert_eq!(r.status(), 405, "{}", r.text());
    assert_eq!(r.head.header("allow"), Some("GET"));
    openai_error(&r);
}

#[test]
fn over_max_streams_is_503_overloaded_in_openai_shape() {
    let srv = start(&[
        "--sim-ttft-ms",
        "0",
        "--sim-itl-ms",
        "50",
        "--max-streams",
        "1",
    ]);
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});
    let mut first = srv.connect();
    first.send(&chat(&body));
    assert_eq!(first.read_head().status, 200);
    assert!(first.next_event().is_some(), "the role chunk");

    let mut c = srv.connect();
    for b in [
        body.clone(),
        json!({"messages": body["messages"], "stream": false}),
    ] {
        let r = c.roundtrip(&chat(&b));
        assert_eq!(r.status(), 503, "{}", r.text());
        assert!(r.head.header("retry-after").is_some(), "{:?}", r.head);
        let (kind, code) = openai_error(&r);
        assert_eq!(code, "overloaded");
        assert!(!kind.is_empty());
    }

    drop(first);
    eventually(&srv.metrics, WAIT, "the first stream to end", || {
        gauge(&srv.metrics.streams_open) == 0
    });
    let r = c.roundtrip(&chat(
        &json!({"messages": body["messages"], "max_tokens": 1, "stream": true}),
    ));
    assert_eq!(r.status(), 200, "{}", r.text());
}

// ------------------------------------------------------------ during the stream

#[test]
fn deadline_mid_stream_is_a_final_error_data_event_without_done() {
    let srv = start(&[
        "--sim-ttft-ms",
        "0",
        "--sim-itl-ms",
        "50",
        "--max-stream-ms",
        "200",
    ]);
    let mut c = srv.connect();
    let r = c.roundtrip(&chat(&json!({
        "model": "m",
        "messages": [{"role": "user", "content": "a long story"}],
        "max_tokens": 1000,
        "stream": true,
        "stream_options": {"include_usage": true}
    })));
    assert_eq!(r.status(), 200);
    let d = datas(&r.body);
    assert!(!d.iter().any(|x| x == "[DONE]"), "no [DONE]: {d:?}");
    let (last, rest) = d.split_last().unwrap();
    let err = parse(last);
    let (_, code) = error_object(&err);
    assert_eq!(code, "deadline_exceeded", "{err}");
    assert!(err.get("choices").is_none(), "{err}");
    assert!(rest.len() >= 2, "role and some content first: {d:?}");
    for x in rest {
        let v = parse(x);
        assert_eq!(v["object"], "chat.completion.chunk", "{v}");
        assert!(v["choices"][0]["finish_reason"].is_null(), "{v}");
        assert!(v.get("usage").is_none(), "{v}");
    }
    // The body ended properly: the connection goes on.
    assert_eq!(c.roundtrip(&get("/healthz", "")).status(), 200);
    assert_eq!(
        srv.metrics
            .errored(sluice::sse::ErrorCode::DeadlineExceeded),
        1
    );
}

#[test]
fn deadline_without_streaming_is_504_in_openai_shape() {
    let srv = start(&[
        "--sim-ttft-ms",
        "0",
        "--sim-itl-ms",
        "50",
        "--max-stream-ms",
        "200",
    ]);
    let mut c = srv.connect();
    let r = c.roundtrip(&chat(&json!({
        "messages": [{"role": "user", "content": "a long story"}],
        "max_tokens": 1000
    })));
    assert_eq!(r.status(), 504, "{}", r.text());
    let (_, code) = openai_error(&r);
    assert_eq!(code, "deadline_exceeded");
}

#[test]
fn heartbeats_are_keep_alive_comments() {
    let srv = start(&[
        "--sim-ttft-ms",
        "400",
        "--sim-itl-ms",
        "1",
        "--heartbeat-ms",
        "50",
    ]);
    let mut c = srv.connect();
    let r = c.roundtrip(&chat(&json!({
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": true
    })));
    assert_eq!(r.status(), 200);
    let text = r.text();
    assert!(!text.contains("event:"), "no named events: {text:?}");
    assert!(!text.contains("heartbeat"), "{text:?}");
    let s = check_stream(&r.body, "m", false);
    // Heartbeats are blocks of one comment and nothing else; several come
    // before the first content delta with text (the role chunk has "").
    let blocks = parse_sse_blocks(&r.body);
    let first_text = blocks
        .iter()
        .position(|b| {
            b.event.as_ref().is_some_and(|e| {
                parse(&e.data)["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
            })
        })
        .expect("a content delta");
    let beats = blocks[..first_text]
        .iter()
        .filter(|b| b.event.is_none() && b.comments == ["keep-alive"])
        .count();
    assert!(
        beats >= 3,
        "several keep-alive comments before the first token: {blocks:?}"
    );
    for b in &blocks {
        assert!(
            b.comments.is_empty() || (b.event.is_none() && b.comments == ["keep-alive"]),
            "a comment outside a heartbeat block: {b:?}"
        );
    }
    assert_eq!(s.text.split_whitespace().count(), 3);
    assert!(load(&srv.metrics.heartbeats_sent) >= 3);
}

#[test]
fn unknown_openai_fields_are_accepted_on_the_sim_backend() {
    let srv = start(FAST);
    let mut c = srv.connect();
    for stream in [true, false] {
        let r = c.roundtrip(&chat(&json!({
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "stream": stream,
            "top_p": 0.5,
            "seed": 42,
            "user": "u-1",
            "presence_penalty": 0.1,
            "logit_bias": {"50256": -100},
            "tools": [{"type": "function", "function": {
                "name": "f", "parameters": {"type": "object", "properties": {}}
            }}],
            "tool_choice": "auto",
            "response_format": {"type": "text"},
            "max_completion_tokens": null,
            "temperature": 0.7,
            "stop": ["zzz"],
            "n": 1
        })));
        assert_eq!(r.status(), 200, "stream {stream}: {}", r.text());
        if stream {
            check_stream(&r.body, "m", false);
        } else {
            assert_eq!(r.json()["object"], "chat.completion");
        }
    }
}

#[test]
fn the_openai_backend_forwards_unknown_fields_unchanged() {
    let fake = FakeUpstream::start(Script::chunks(3));
    let url = fake.url();
    let srv = start(&["--backend", "openai", "--upstream-url", &url]);
    let mut c = srv.connect();
    let r = c.roundtrip(&chat(&json!({
        "model": "client-model",
        "messages": [{"role": "user", "content": "q"}],
        "max_tokens": 4,
        "stream": true,
        "top_p": 0.25,
        "seed": 1234,
        "user": "u-7",
        "logit_bias": {"42": 3}
    })));
    assert_eq!(r.status(), 200, "{}", r.text());
    let s = check_stream(&r.body, "client-model", false);
    let want: String = (0..3).map(|i| token_text(i, 0)).collect();
    assert_eq!(s.text, want);

    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    let b = &reqs[0].body;
    assert_eq!(b["top_p"], json!(0.25), "{b}");
    assert_eq!(b["seed"], json!(1234), "{b}");
    assert_eq!(b["user"], "u-7", "{b}");
    assert_eq!(b["logit_bias"], json!({"42": 3}), "{b}");
    assert_eq!(b["model"], "client-model", "{b}");
    assert_eq!(b["max_tokens"], 4, "{b}");
    assert_eq!(
        b["messages"],
        json!([{"role": "user", "content": "q"}]),
        "{b}"
    );
}

#[test]
fn models_lists_the_served_model() {
    let srv = start(FAST);
    let mut c = srv.connect();
    let r = c.roundtrip(&get("/v1/models", ""));
    assert_eq!(r.status(), 200);
    assert_eq!(r.head.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["object"], "list", "{v}");
    let data = v["data"].as_array().expect("data");
    assert_eq!(data.len(), 1, "{v}");
    assert_eq!(data[0]["id"], "sluice-sim", "{v}");
    assert_eq!(data[0]["object"], "model", "{v}");

    let named = start(&fast_with(&["--upstream-model", "gpt-test-1"]));
    let r = named.connect().roundtrip(&get("/v1/models", ""));
    let v = r.json();
    assert_eq!(v["data"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["data"][0]["id"], "gpt-test-1", "{v}");
}

#[test]
fn a_client_leaving_mid_stream_cancels_it() {
    let srv = start(&["--sim-ttft-ms", "0", "--sim-itl-ms", "50"]);
    let mut c = srv.connect();
    c.send(&chat(&json!({
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 64,
        "stream": true
    })));
    assert_eq!(c.read_head().status, 200);
    let role = c.next_event().expect("role chunk");
    assert_eq!(role.json()["choices"][0]["delta"]["role"], "assistant");
    let tok = c.next_event().expect("a content chunk");
    assert!(tok.json()["choices"][0]["delta"]["content"].is_string());
    eventually(&srv.metrics, WAIT, "streams_open=1", || {
        gauge(&srv.metrics.streams_open) == 1
    });
    drop(c);
    eventually(
        &srv.metrics,
        WAIT,
        "disconnected=1 and streams_open=0",
        || {
            load(&srv.metrics.streams_disconnected) == 1
                && gauge(&srv.metrics.streams_open) == 0
                && gauge(&srv.metrics.connections_open) == 0
        },
    );
    assert_eq!(load(&srv.metrics.streams_completed), 0);
    assert!(load(&srv.metrics.tokens_sent) < 64);
}

// ------------------------------------------------------------------ CORS

#[test]
fn without_cors_origin_no_cors_headers_and_options_is_405() {
    let srv = start(FAST);
    let mut c = srv.connect();
    let origin = "Origin: http://a.example\r\n";
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let reqs = [
        chat_with(
            &json!({"messages": msgs, "max_tokens": 2, "stream": true}),
            origin,
        ),
        chat_with(&json!({"messages": msgs, "max_tokens": 2}), origin),
        post(CHAT, "{", origin),
        get("/v1/models", origin),
        get(CHAT, origin),
    ];
    for req in &reqs {
        let r = c.roundtrip(req);
        assert!(cors_headers(&r.head).is_empty(), "{:?}", r.head);
    }
    let r = c.roundtrip(
        format!(
            "OPTIONS {CHAT} HTTP/1.1\r\nHost: t\r\n{origin}\
             Access-Control-Request-Method: POST\r\n\
             Access-Control-Request-Headers: content-type\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(r.status(), 405, "{:?}", r.head);
    assert!(cors_headers(&r.head).is_empty(), "{:?}", r.head);
}

fn preflight(origin: &str) -> Vec<u8> {
    format!(
        "OPTIONS {CHAT} HTTP/1.1\r\nHost: t\r\nOrigin: {origin}\r\n\
         Access-Control-Request-Method: POST\r\n\
         Access-Control-Request-Headers: content-type, authorization\r\n\r\n"
    )
    .into_bytes()
}

#[test]
fn cors_origin_allows_the_listed_origin_only() {
    let srv = start(&fast_with(&["--cors-origin", "http://a.example"]));
    let mut c = srv.connect();
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let stream = json!({"messages": msgs, "max_tokens": 2, "stream": true});
    let whole = json!({"messages": msgs, "max_tokens": 2});

    for (origin, allowed) in [("http://a.example", true), ("http://b.example", false)] {
        let h = format!("Origin: {origin}\r\n");
        let reqs = [
            (chat_with(&stream, &h), 200),
            (chat_with(&whole, &h), 200),
            (post(CHAT, "{", &h), 400),
            (get(CHAT, &h), 405),
            (get("/v1/models", &h), 200),
        ];
        for (req, status) in &reqs {
            let r = c.roundtrip(req);
            assert_eq!(r.status(), *status, "{origin}: {:?}", r.head);
            if allowed {
                assert_eq!(
                    r.head.header("access-control-allow-origin"),
                    Some(origin),
                    "{:?}",
                    r.head
                );
                assert!(
                    r.head
                        .headers
                        .iter()
                        .any(|(n, v)| n == "vary" && v.contains("Origin")),
                    "{:?}",
                    r.head
                );
            } else {
                assert!(cors_headers(&r.head).is_empty(), "{origin}: {:?}", r.head);
            }
        }
    }
    // No Origin: no CORS headers.
    let r = c.roundtrip(&chat(&whole));
    assert!(cors_headers(&r.head).is_empty(), "{:?}", r.head);

    // Preflight.
    let r = c.roundtrip(&preflight("http://a.example"));
    assert_eq!(r.status(), 204, "{:?}", r.head);
    assert!(r.body.is_empty());
    assert_eq!(
        r.head.header("access-control-allow-origin"),
        Some("http://a.example")
    );
    let methods = r
        .head
        .header("access-control-allow-methods")
        .expect("Allow-Methods");
    assert!(methods.split(',').any(|m| m.trim() == "POST"), "{methods}");
    let headers = r
        .head
        .header("access-control-allow-headers")
        .expect("Allow-Headers")
        .to_ascii_lowercase();
    assert!(
        headers.split(',').any(|h| h.trim() == "content-type"),
        "{headers}"
    );
    let r = c.roundtrip(&preflight("http://b.example"));
    assert!(
        r.head.header("access-control-allow-origin").is_none(),
        "{:?}",
        r.head
    );
    assert!(
        r.head.header("access-control-allow-methods").is_none(),
        "{:?}",
        r.head
    );
    // The connection is still fine.
    assert_eq!(c.roundtrip(&get("/healthz", "")).status(), 200);
}

#[test]
fn cors_origin_star_allows_any_origin() {
    let srv = start(&fast_with(&["--cors-origin", "*"]));
    let mut c = srv.connect();
    let h = "Origin: http://anything.example:8000\r\n";
    let msgs = json!([{"role": "user", "content": "hi"}]);
    for req in [
        chat_with(
            &json!({"messages": msgs, "max_tokens": 2, "stream": true}),
            h,
        ),
        chat_with(&json!({"messages": msgs, "max_tokens": 2}), h),
        post(CHAT, "{", h),
    ] {
        let r = c.roundtrip(&req);
        assert_eq!(
            r.head.header("access-control-allow-origin"),
            Some("*"),
            "{:?}",
            r.head
        );
    }
    let r = c.roundtrip(&preflight("http://b.example"));
    assert_eq!(r.status(), 204);
    assert_eq!(r.head.header("access-control-allow-origin"), Some("*"));
    assert!(r.head.header("access-control-allow-methods").is_some());
}

// ------------------------------------------------------------------ demo page

#[test]
fn the_demo_page_is_served_at_root() {
    let srv = start(FAST);
    let r = srv.connect().roundtrip(&get("/", ""));
    assert_eq!(r.status(), 200);
    let ct = r.head.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/html"), "{ct}");
    assert_eq!(r.head.content_length(), Some(r.body.len()));
    let page = r.text();
    assert!(page.contains("aria-live"), "{page}");
    assert!(
        page.contains("/v1/chat/stream") && page.contains("text/event-stream"),
        "{page}"
    );
}

// ------------------------------------------------------------------ edges

#[test]
fn an_upstream_failure_on_this_endpoint_is_a_final_error_data_event() {
    let fake = FakeUpstream::start(Script::chunks(2));
    fake.route(
        "e500",
        Script::Status(500, error_body("the model crashed", "server_error")),
    );
    fake.route(
        "midway",
        Script::ErrorEvent {
            after: 2,
            message: "went wrong".into(),
        },
    );
    let url = fake.url();
    let srv = start(&["--backend", "openai", "--upstream-url", &url]);
    let mut c = srv.connect();
    for (prompt, contents, message) in [("e500", 0, "the model crashed"), ("midway", 2, "")] {
        let r = c.roundtrip(&chat(&json!({
            "model": "m",
            "messages": [{"role": "user", "content": prompt}],
            "stream": true
        })));
        assert_eq!(r.status(), 200, "{}", r.text());
        let d = datas(&r.body);
        assert!(!d.iter().any(|x| x == "[DONE]"), "no [DONE]: {d:?}");
        let (last, rest) = d.split_last().unwrap();
        let err = parse(last);
        let (_, code) = error_object(&err);
        assert_eq!(code, "upstream_error", "{err}");
        if !message.is_empty() {
            assert_eq!(err["error"]["message"], message, "{err}");
        }
        // The role chunk, then the content relayed before the failure.
        assert_eq!(rest.len(), 1 + contents, "{d:?}");
        assert_eq!(parse(&rest[0])["choices"][0]["delta"]["role"], "assistant");
    }
    assert_eq!(c.roundtrip(&get("/healthz", "")).status(), 200);
}

#[test]
fn http_1_0_streams_are_close_delimited() {
    let srv = start(FAST);
    let mut c = srv.connect();
    let body = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": true
    })
    .to_string();
    c.send(
        format!(
            "POST {CHAT} HTTP/1.0\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let head = c.read_head();
    assert_eq!(head.status, 200, "{head:?}");
    assert!(!head.is_chunked(), "{head:?}");
    let raw = c.read_to_eof();
    let s = check_stream(&raw, "m", false);
    assert_eq!(s.text.split_whitespace().count(), 3, "{}", s.text);
}

#[test]
fn a_body_over_the_limit_is_413_in_openai_shape_with_cors() {
    let srv = start(&fast_with(&[
        "--cors-origin",
        "http://a.example",
        "--max-body-bytes",
        "1000",
    ]));
    let mut c = srv.connect();
    let big = json!({"messages": [{"role": "user", "content": "x".repeat(2000)}]});
    let r = c.roundtrip(&chat_with(&big, "Origin: http://a.example\r\n"));
    assert_eq!(r.status(), 413, "{}", r.text());
    assert_eq!(
        r.head.header("access-control-allow-origin"),
        Some("http://a.example"),
        "a browser can read the refusal only with CORS headers: {:?}",
        r.head
    );
    let (kind, code) = openai_error(&r);
    assert_eq!(kind, "invalid_request_error");
    assert_eq!(code, "payload_too_large");
}

// ---------------------------------------------------------------- tool calls

/// An upstream answer that calls a tool, in the shape OpenAI streams it:
/// the call's id and name first, its arguments in two pieces, then
/// `finish_reason: tool_calls` and usage.
fn tool_call_stream() -> Vec<u8> {
    let chunk = |delta: Value, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({"id":"up","object":"chat.completion.chunk","created":1,"model":"m",
                   "choices":[{"index":0,"delta":delta,"logprobs":null,"finish_reason":finish}]})
        )
    };
    let mut body = String::new();
    body += &chunk(json!({"role":"assistant","content":null}), Value::Null);
    body += &chunk(
        json!({"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]}),
        Value::Null,
    );
    body += &chunk(
        json!({"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]}),
        Value::Null,
    );
    body += &chunk(
        json!({"tool_calls":[{"index":0,"function":{"arguments":"\"Paris\"}"}}]}),
        Value::Null,
    );
    body += &chunk(json!({}), json!("tool_calls"));
    body += &format!(
        "data: {}\n\ndata: [DONE]\n\n",
        json!({"id":"up","object":"chat.completion.chunk","created":1,"model":"m","choices":[],
               "usage":{"prompt_tokens":4294967295u64,"completion_tokens":9,"total_tokens":9}})
    );
    format!("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n{body}")
        .into_bytes()
}

fn tool_request(stream: bool) -> Value {
    json!({
        "model": "m",
        "stream": stream,
        "stream_options": {"include_usage": true},
        "tools": [{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "weather?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id":"call_0","type":"function","function":{"name":"get_weather","arguments":"{}"}}]},
            {"role": "tool", "tool_call_id": "call_0", "name": "get_weather", "content": "sunny"}
        ]
    })
}

#[test]
fn tool_calls_pass_through_both_ways_streaming_and_not() {
    let fake = FakeUpstream::start(Script::Raw(tool_call_stream()));
    let url = fake.url();
    let srv = start(&[
        "--backend",
        "openai",
        "--upstream-url",
        &url,
        "--system-prompt",
        "be brief",
    ]);
    let mut c = srv.connect();

    // Streaming: the tool-call deltas arrive as the upstream sent them.
    let r = c.roundtrip(&chat(&tool_request(true)));
    assert_eq!(r.status(), 200, "{}", r.text());
    let chunks: Vec<Value> = datas(&r.body)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| parse(d))
        .collect();
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|ch| ch["choices"][0]["delta"].get("tool_calls"))
        .collect();
    assert_eq!(calls.len(), 3, "{chunks:?}");
    assert_eq!(calls[0][0]["id"], "call_1");
    assert_eq!(calls[0][0]["function"]["name"], "get_weather");
    let args: String = calls
        .iter()
        .map(|c| c[0]["function"]["arguments"].as_str().unwrap())
        .collect();
    assert_eq!(args, r#"{"city":"Paris"}"#);
    let finish = chunks
        .iter()
        .find_map(|ch| ch["choices"][0]["finish_reason"].as_str())
        .unwrap();
    assert_eq!(finish, "tool_calls");
    let usage = chunks.iter().find_map(|ch| ch.get("usage")).unwrap();
    assert_eq!(usage["total_tokens"], 4294967295u64 + 9, "no wrap: {usage}");

    // The request went upstream as the client sent it, system prompt first.
    let sent = &fake.requests()[0].body;
    assert_eq!(
        sent["messages"][0],
        json!({"role":"system","content":"be brief"})
    );
    assert_eq!(sent["messages"][1]["content"][1]["type"], "image_url");
    assert_eq!(sent["messages"][2]["tool_calls"][0]["id"], "call_0");
    assert_eq!(sent["messages"][3]["tool_call_id"], "call_0");
    assert_eq!(sent["messages"][3]["name"], "get_weather");
    assert_eq!(sent["tools"][0]["function"]["name"], "get_weather");

    // Not streaming: one message with the calls merged.
    let r = c.roundtrip(&chat(&tool_request(false)));
    assert_eq!(r.status(), 200, "{}", r.text());
    let v = r.json();
    let m = &v["choices"][0]["message"];
    assert_eq!(m["content"], Value::Null, "{v}");
    assert_eq!(m["tool_calls"][0]["id"], "call_1", "{v}");
    assert_eq!(m["tool_calls"][0]["type"], "function");
    assert_eq!(m["tool_calls"][0]["function"]["name"], "get_weather");
    assert_eq!(
        m["tool_calls"][0]["function"]["arguments"],
        r#"{"city":"Paris"}"#
    );
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
}

#[test]
fn without_a_usage_chunk_the_prompt_count_is_left_out_not_zero() {
    let fake = FakeUpstream::start(Script::Raw(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n\
          data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":\"stop\"}]}\n\n\
          data: [DONE]\n\n"
            .to_vec(),
    ));
    let url = fake.url();
    let srv = start(&["--backend", "openai", "--upstream-url", &url]);
    let r = srv.connect().roundtrip(&chat(&json!({
        "messages": [{"role": "user", "content": "x"}]
    })));
    let v = r.json();
    assert_eq!(v["usage"], json!({"completion_tokens": 1}), "{v}");
    let (_, evs) = stream_events(srv.addr, &post_stream(r#"{"prompt":"x"}"#));
    let done = evs.last().unwrap().json();
    assert!(done["usage"].get("prompt_tokens").is_none(), "{done}");
}
