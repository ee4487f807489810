//! https: sluice-load speaks TLS (rustls) to a server whose certificate
//! comes from `--cacert`, and still measures each stream.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use support::{f, run, serial, tmp, within};

/// A TLS server on 127.0.0.1:0 answering every request with: head at
/// 50 ms, token "a" at 100 ms, done at 150 ms (keep-alive). Returns the port
/// and the CA file.
fn tls_server() -> (u16, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let ca = tmp("ca.pem");
    std::fs::write(&ca, cert.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap(),
    );
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            let config = config.clone();
            thread::spawn(move || {
                s.set_nodelay(true).unwrap();
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = BufReader::new(rustls::StreamOwned::new(conn, s));
                loop {
                    let mut len = 0;
                    loop {
                        let mut line = String::new();
                        if tls.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; len];
                    if tls.read_exact(&mut body).is_err() {
                        return;
                    }
                    let t0 = Instant::now();
                    let at = |ms: u64| {
                        let due = t0 + Duration::from_millis(ms);
                        let now = Instant::now();
                        if due > now {
                            thread::sleep(due - now);
                        }
                    };
                    let w = tls.get_mut();
                    at(50);
                    let _ = w.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
                    let _ = w.flush();
                    at(100);
                    let tok = "event: token\ndata: {\"t\":\"a\"}\n\n";
                    let _ = write!(w, "{:x}\r\n{tok}\r\n", tok.len());
                    let _ = w.flush();
                    at(150);
                    let done = "event: done\ndata: {}\n\n";
                    let _ = write!(w, "{:x}\r\n{done}\r\n0\r\n\r\n", done.len());
                    let _ = w.flush();
                }
            });
        }
    });
    (port, ca)
}

#[test]
fn https_with_a_private_ca() {
    let _g = serial();
    let (port, ca) = tls_server();
    let url = format!("https://127.0.0.1:{port}/v1/chat/stream");
    let (v, table) = run(&[
        "--url",
        &url,
        "--cacert",
        ca.to_str().unwrap(),
        "--concurrency",
        "2",
        "--requests",
        "4",
    ]);
    assert_eq!(f(&v, "streams.done"), 4.0, "{table}");
    within(&v, "head_ms", 50.0, 90.0);
    within(&v, "ttft_ms", 100.0, 140.0);

    // without the CA the certificate is refused: every stream fails to connect
    let (v, _) = run(&["--url", &url, "--concurrency", "1", "--requests", "2"]);
    assert_eq!(f(&v, "streams.done"), 0.0);
    assert_eq!(f(&v, "streams.started"), 2.0);
    assert_eq!(f(&v, "streams.connect_error"), 2.0);
}
