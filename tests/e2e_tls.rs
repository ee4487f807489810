//! An https upstream behind a private CA (`--upstream-ca-file`): sluice
//! verifies the certificate with rustls and relays the stream.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

fn tls_upstream() -> (u16, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    // One folder per call: the tests run in parallel and each has its own CA.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("sluice-tls-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, cert.pem()).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for sock in listener.incoming().take(4) {
            let Ok(sock) = sock else { continue };
            let config = config.clone();
            std::thread::spawn(move || serve(config, sock));
        }
    });
    (port, ca)
}

fn serve(config: Arc<rustls::ServerConfig>, sock: TcpStream) {
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let conn = rustls::ServerConnection::new(config).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut reader = BufReader::new(&mut tls);
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    let mut out = String::from(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n",
    );
    for t in ["Secure", " hello"] {
        out.push_str(&format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{t}\"}}}}]}}\n\n"
        ));
    }
    out.push_str(
        "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n",
    );
    tls.write_all(out.as_bytes()).unwrap();
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

fn stream(addr: std::net::SocketAddr) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = r#"{"prompt":"hi"}"#;
    write!(
        c,
        "POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut s = String::new();
    let _ = c.read_to_string(&mut s);
    s
}

fn start(args: &[&str]) -> std::net::SocketAddr {
    let mut argv = vec![
        "sluice",
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "openai",
        "--log-level",
        "error",
    ];
    argv.extend_from_slice(args);
    let server = sluice::Server::bind(sluice::Config::parse_from(argv), None).unwrap();
    let addr = server.local_addr();
    std::thread::spawn(move || server.run());
    addr
}

#[test]
fn an_https_upstream_with_a_private_ca_streams() {
    let (port, ca) = tls_upstream();
    let url = format!("https://localhost:{port}/v1");
    let addr = start(&[
        "--upstream-url",
        &url,
        "--upstream-ca-file",
        ca.to_str().unwrap(),
    ]);
    let s = stream(addr);
    assert!(s.contains("data: {\"t\":\"Secure\"}"), "{s}");
    assert!(s.contains("data: {\"t\":\" hello\"}"), "{s}");
    assert!(s.contains("event: done"), "{s}");
    let _ = std::fs::remove_dir_all(ca.parent().unwrap());
}

#[test]
fn an_untrusted_certificate_is_an_upstream_error_event() {
    // The bundled web roots do not trust our self-signed certificate: the
    // handshake fails, nothing is sent, the upstream is unavailable.
    let (port, ca) = tls_upstream();
    let url = format!("https://localhost:{port}/v1");
    let addr = start(&["--upstream-url", &url]);
    let s = stream(addr);
    assert!(s.contains("event: error"), "{s}");
    assert!(s.contains("\"code\":\"upstream_unavailable\""), "{s}");
    assert!(s.contains("TLS handshake"), "{s}");
    assert!(!s.contains("event: token"), "{s}");
    let _ = std::fs::remove_dir_all(ca.parent().unwrap());
}
