//! End to end through the real binary: flags, `SLUICE_*` environment
//! variables (given to the child only: it never inherits the test's), the
//! `listening on` line on stderr, `--help`.

mod support;

use support::*;

#[test]
fn binary_streams_with_env_and_flags() {
    let bin = Binary::spawn(
        &["--listen", "127.0.0.1:0", "--sim-ttft-ms", "0"],
        &[("SLUICE_SIM_TOKENS", "3"), ("SLUICE_SIM_ITL_MS", "1")],
    );
    let addr = bin.addr;
    let (head, events) = stream_events(addr, &post_stream(r#"{"prompt":"hi"}"#));
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert_eq!(tokens_until_done(&events).len(), 3, "{events:?}");
    let d = events.last().unwrap().json();
    assert_eq!(d["finish_reason"], "stop", "{d}");
    assert_eq!(d["usage"]["completion_tokens"], 3, "{d}");

    let mut c = Client::connect(addr);
    let r = c.roundtrip(&get("/metrics", ""));
    assert_eq!(
        prom_value(&r.text(), "sluice_streams_completed_total"),
        Some(1.0)
    );
}

#[test]
fn binary_flag_beats_env_and_boolean_env_works() {
    let bin = Binary::spawn(
        &["--listen", "127.0.0.1:0", "--sim-tokens", "2"],
        &[
            ("SLUICE_SIM_TOKENS", "9"),
            ("SLUICE_SIM_TTFT_MS", "0"),
            ("SLUICE_SIM_ITL_MS", "1"),
            ("SLUICE_NO_STREAMING", "true"),
        ],
    );
    let mut c = Client::connect(bin.addr);
    let r = c.roundtrip(&post_stream(r#"{"prompt":"hi"}"#));
    assert_eq!(r.status(), 200);
    assert_eq!(r.head.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["usage"]["completion_tokens"], 2, "{v}");
}

#[test]
fn binary_help_lists_flags_and_env_vars() {
    let out = sluice_command().arg("--help").output().expect("run --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "--heartbeat-ms",
        "SLUICE_HEARTBEAT_MS",
        "--listen",
        "SLUICE_LISTEN",
        "--max-streams",
        "--write-timeout-ms",
        "--no-streaming",
        "15000",
    ] {
        assert!(text.contains(want), "--help lacks {want:?}:\n{text}");
    }
}

#[test]
fn binary_refuses_a_bad_flag() {
    let out = sluice_command()
        .args(["--listen", "127.0.0.1:0", "--heartbeat-ms", "soon"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
}

/// The real binary's standard error, polled (bounded) until a line holds `what`.
fn log_shows(bin: &Binary, what: &str) -> bool {
    wait_until(std::time::Duration::from_secs(5), || {
        bin.log().iter().any(|l| l.contains(what))
    })
}

#[test]
fn an_upstream_url_without_its_api_base_is_named_at_start() {
    let fake = support::fake_upstream::FakeUpstream::start(support::fake_upstream::Script::Status(
        404,
        "{}".into(),
    ));
    // The fake serves its API under /v1; leave that off, as new users do.
    let url = fake.url().trim_end_matches("/v1").to_string();
    let bin = Binary::spawn(&["--listen", "127.0.0.1:0", "--upstream-url", &url], &[]);
    assert!(
        log_shows(&bin, "probably missing its API base"),
        "{:?}",
        bin.log()
    );
    // --upstream-url alone selected the openai backend; it still runs.
    let r = Client::connect(bin.addr).roundtrip(&get("/readyz", ""));
    assert_eq!(r.status(), 200, "the upstream answers HTTP: reachable");
}

#[test]
fn an_unreachable_upstream_at_start_is_a_warning_and_not_ready() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/v1");
    let bin = Binary::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "openai",
            "--upstream-url",
            &url,
        ],
        &[],
    );
    assert!(log_shows(&bin, "unreachable"), "{:?}", bin.log());
    let r = Client::connect(bin.addr).roundtrip(&get("/readyz", ""));
    assert_eq!(r.status(), 503);
}

#[test]
fn dependent_flags_are_checked_with_a_message_naming_the_flag() {
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "--backend",
                "sim",
                "--upstream-url",
                "http://127.0.0.1:1/v1",
            ],
            "--backend openai",
        ),
        (&["--backend", "openai"], "--upstream-url"),
        (&["--redact", "a.*b"], "--redact"),
    ];
    for (args, want) in cases {
        let out = sluice_command().args(args).output().expect("run sluice");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn sighup_reloads_the_key_file_without_dropping_a_stream() {
    let dir = std::env::temp_dir().join(format!("sluice-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    std::fs::write(&keys, "alice:alice-key-123\n").unwrap();
    let kf = keys.to_str().unwrap();
    let bin = Binary::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--api-key-file",
            kf,
            "--sim-itl-ms",
            "20",
            "--sim-ttft-ms",
            "0",
        ],
        &[],
    );
    let auth = |k: &str| format!("Authorization: Bearer {k}\r\n");
    let mut streaming = Client::connect(bin.addr);
    streaming.send(&post(
        "/v1/chat/stream",
        r#"{"prompt":"x","max_tokens":40}"#,
        &auth("alice-key-123"),
    ));
    assert_eq!(streaming.read_head().status, 200);
    std::fs::write(&keys, "bob:bobby-key-456\n").unwrap();
    let hup = |pid: u32| {
        std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill");
    };
    hup(bin.pid());
    assert!(
        log_shows(&bin, "API keys reloaded: 1 keys"),
        "{:?}",
        bin.log()
    );
    let mut c = Client::connect(bin.addr);
    let r = c.roundtrip(&get("/v1/models", &auth("bobby-key-456")));
    assert_eq!(r.status(), 200);
    let r = c.roundtrip(&get("/v1/models", &auth("alice-key-123")));
    assert_eq!(r.status(), 401);
    // A bad file keeps the old keys.
    std::fs::write(&keys, "bob:short\n").unwrap();
    hup(bin.pid());
    assert!(
        log_shows(&bin, "keeping the old API keys"),
        "{:?}",
        bin.log()
    );
    let r = c.roundtrip(&get("/v1/models", &auth("bobby-key-456")));
    assert_eq!(r.status(), 200);
    // The stream started before the reload ran to its end.
    let evs = streaming.events_to_end();
    assert_eq!(evs.last().unwrap().event, "done");
    assert_eq!(tokens_until_done(&evs).len(), 40);
    let log = bin.log().join("\n");
    assert!(
        !log.contains("alice-key-123") && !log.contains("bobby-key-456"),
        "no key in the log"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn json_logs_are_one_object_per_line_with_the_access_fields() {
    let bin = Binary::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--sim-ttft-ms",
            "0",
            "--sim-itl-ms",
            "0",
        ],
        &[],
    );
    let (head, _) = stream_events(bin.addr, &post_stream(r#"{"prompt":"x","max_tokens":2}"#));
    let sid = head.header("x-stream-id").unwrap().to_string();
    assert!(log_shows(&bin, "outcome=done"), "{:?}", bin.log());
    let access: Vec<serde_json::Value> = bin
        .log()
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("each log line is one JSON object"))
        .filter(|v: &serde_json::Value| v["target"] == "sluice::access")
        .collect();
    let a = access.last().expect("an access line");
    assert_eq!(a["method"], "POST");
    assert_eq!(a["path"], "/v1/chat/stream");
    assert_eq!(a["status"], 200);
    assert_eq!(a["outcome"], "done");
    assert_eq!(a["stream"], sid.as_str());
    assert_eq!(a["tokens"], 2);
    assert!(
        a["ttft_ms"].is_number() && a["duration_ms"].is_number(),
        "{a}"
    );
    assert!(a["time"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn a_bad_resume_store_is_refused_without_showing_its_password() {
    let cases: [&[&str]; 3] = [
        &[
            "--resume-store",
            "redis://bob:S3CRET-pw@h:6379/x",
            "--resume-window-ms",
            "5",
        ],
        &[
            "--resume-store",
            "memcached://bob:S3CRET-pw@h:1",
            "--resume-window-ms",
            "5",
        ],
        // Valid, but a store needs resumable streams.
        &["--resume-store", "redis://bob:S3CRET-pw@h:6379"],
    ];
    for args in cases {
        let out = sluice_command().args(args).output().expect("run sluice");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--resume-store"), "{args:?}: {err}");
        assert!(!err.contains("S3CRET"), "the password leaked: {err}");
    }
}

#[test]
fn an_unreachable_resume_store_is_a_warning_and_streams_go_on() {
    // A loopback port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("redis://:S3CRET-pw@127.0.0.1:{port}");
    let bin = Binary::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--resume-window-ms",
            "5000",
            "--resume-store",
            &url,
            "--sim-ttft-ms",
            "0",
            "--sim-itl-ms",
            "1",
        ],
        &[],
    );
    assert!(log_shows(&bin, "unreachable"), "{:?}", bin.log());
    assert!(
        bin.log().iter().all(|l| !l.contains("S3CRET")),
        "{:?}",
        bin.log()
    );
    let (head, events) = stream_events(bin.addr, &post_stream(r#"{"prompt":"hi","max_tokens":3}"#));
    assert_eq!(head.status, 200);
    assert_eq!(events.last().map(|e| e.event.as_str()), Some("done"));
    let r = Client::connect(bin.addr).roundtrip(&get("/readyz", ""));
    assert_eq!(r.status(), 200);
    assert!(r.text().contains("degraded"), "{}", r.text());
}
