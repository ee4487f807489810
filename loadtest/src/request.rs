//! What is sent: the target (URL → address, Host, path, TLS or not) and
//! the request bodies (from --prompt/--max-tokens, --body, or a JSON-lines
//! file picked round-robin or at random), shaped for the native or the
//! OpenAI endpoint.

use crate::arrival::Rng;
use crate::cli::{Args, PromptOrder};
use crate::events::Format;
use serde_json::{json, Map, Value};
use std::net::{SocketAddr, ToSocketAddrs};

/// Where requests go.
#[derive(Debug, Clone)]
pub struct Target {
    pub tls: bool,
    /// Host name as written in the URL (for SNI and certificate checks).
    pub host: String,
    /// The `Host` header value.
    pub host_header: String,
    pub path: String,
    pub addr: SocketAddr,
}

impl Target {
    pub fn parse(s: &str) -> Result<Target, String> {
        let u = url::Url::parse(s).map_err(|e| format!("--url {s:?}: {e}"))?;
        let tls = match u.scheme() {
            "http" => false,
            "https" => true,
            other => return Err(format!("--url {s:?}: scheme {other} (want http or https)")),
        };
        let host = u
            .host_str()
            .ok_or_else(|| format!("--url {s:?}: no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = u.port_or_known_default().unwrap_or(80);
        let addr = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| format!("--url {s:?}: cannot resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("--url {s:?}: {host} has no address"))?;
        let host_header = match u.port() {
            Some(p) => format!("{}:{p}", u.host_str().unwrap_or(&host)),
            None => u.host_str().unwrap_or(&host).to_string(),
        };
        let mut path = u.path().to_string();
        if let Some(q) = u.query() {
            path.push('?');
            path.push_str(q);
        }
        Ok(Target {
            tls,
            host,
            host_header,
            path,
            addr,
        })
    }

    pub fn is_loopback(&self) -> bool {
        self.addr.ip().is_loopback()
    }
}

/// Request bodies to cycle through.
#[derive(Debug, Clone)]
pub struct Bodies {
    items: Vec<Vec<u8>>,
    order: PromptOrder,
    next: usize,
    rng: Rng,
}

impl Bodies {
    pub fn from_args(args: &Args, max_tokens: u64) -> Result<Bodies, String> {
        let legacy = args
            .url
            .as_deref()
            .is_some_and(|u| u.contains("/completions") && !u.contains("chat/completions"));
        let items = if let Some(b) = &args.body {
            serde_json::from_str::<Value>(b).map_err(|e| format!("--body is not JSON: {e}"))?;
            vec![b.clone().into_bytes()]
        } else if let Some(path) = &args.prompts {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--prompts {}: {e}", path.display()))?;
            let mut v = Vec::new();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let obj: Map<String, Value> = serde_json::from_str(line)
                    .map_err(|e| format!("--prompts {} line {}: {e}", path.display(), i + 1))?;
                v.push(shape(
                    args.format,
                    legacy,
                    args.model.as_deref(),
                    obj,
                    max_tokens,
                ));
            }
            if v.is_empty() {
                return Err(format!("--prompts {}: no lines", path.display()));
            }
            v
        } else {
            let mut obj = Map::new();
            obj.insert("prompt".into(), json!(args.prompt));
            vec![shape(
                args.format,
                legacy,
                args.model.as_deref(),
                obj,
                max_tokens,
            )]
        };
        Ok(Bodies {
            items,
            order: args.prompt_order,
            next: 0,
            rng: Rng::new(args.seed.wrapping_add(17)),
        })
    }

    pub fn next_body(&mut self) -> &[u8] {
        let i = match self.order {
            PromptOrder::RoundRobin => {
                let i = self.next % self.items.len();
                self.next += 1;
                i
            }
            PromptOrder::Random => self.rng.below(self.items.len()),
        };
        &self.items[i]
    }
}

/// One body for `format` from a prompt object; fields the format does not
/// name are kept as they are.
fn shape(
    format: Format,
    legacy_completions: bool,
    model: Option<&str>,
    mut obj: Map<String, Value>,
    max_tokens: u64,
) -> Vec<u8> {
    if format == Format::Openai {
        if !legacy_completions && !obj.contains_key("messages") {
            if let Some(p) = obj.remove("prompt") {
                obj.insert("messages".into(), json!([{"role": "user", "content": p}]));
            }
        }
        obj.insert("stream".into(), json!(true));
    }
    if let Some(m) = model {
        obj.entry("model").or_insert_with(|| json!(m));
    }
    obj.entry("max_tokens").or_insert_with(|| json!(max_tokens));
    serde_json::to_vec(&Value::Object(obj)).expect("a JSON map serializes")
}

/// `--header "Name: value"` → (name, value).
pub fn parse_headers(hs: &[String]) -> Vec<(String, String)> {
    hs.iter()
        .filter_map(|h| h.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["sluice-load", "--url", "http://127.0.0.1:9/v1/chat/stream"];
        v.extend_from_slice(extra);
        Args::parse_from(v)
    }

    #[test]
    fn targets() {
        let t = Target::parse("http://127.0.0.1:8080/v1/chat/stream?x=1").unwrap();
        assert!(!t.tls && t.is_loopback());
        assert_eq!(
            (t.host_header.as_str(), t.path.as_str()),
            ("127.0.0.1:8080", "/v1/chat/stream?x=1")
        );
        let t = Target::parse("https://localhost/v1").unwrap();
        assert!(t.tls);
        assert_eq!(t.addr.port(), 443);
        assert_eq!(t.host, "localhost");
        assert!(Target::parse("ftp://x/").is_err());
    }

    #[test]
    fn bodies_per_format() {
        let mut b = Bodies::from_args(&args(&["--prompt", "hi", "--max-tokens", "5"]), 5).unwrap();
        let v: Value = serde_json::from_slice(b.next_body()).unwrap();
        assert_eq!(v, json!({"prompt": "hi", "max_tokens": 5}));
        let a = args(&["--format", "openai", "--model", "m", "--prompt", "hi"]);
        let mut b = Bodies::from_args(&a, 7).unwrap();
        let v: Value = serde_json::from_slice(b.next_body()).unwrap();
        assert_eq!(
            v,
            json!({"messages": [{"role": "user", "content": "hi"}], "stream": true, "model": "m", "max_tokens": 7})
        );
    }

    #[test]
    fn prompts_file_round_robin_and_random() {
        let dir = std::env::temp_dir().join(format!("sluice-load-prompts-{}", std::process::id()));
        std::fs::write(
            &dir,
            "{\"prompt\":\"a\"}\n\n{\"prompt\":\"b\",\"max_tokens\":3}\n",
        )
        .unwrap();
        let p = dir.to_str().unwrap();
        let mut b = Bodies::from_args(&args(&["--prompts", p]), 9).unwrap();
        let got: Vec<Value> = (0..3)
            .map(|_| serde_json::from_slice(b.next_body()).unwrap())
            .collect();
        assert_eq!(got[0], json!({"prompt": "a", "max_tokens": 9}));
        assert_eq!(got[1], json!({"prompt": "b", "max_tokens": 3}));
        assert_eq!(got[2], got[0]);
        let pick = |seed: &str| {
            let mut b = Bodies::from_args(
                &args(&["--prompts", p, "--prompt-order", "random", "--seed", seed]),
                9,
            )
            .unwrap();
            (0..32).map(|_| b.next_body().to_vec()).collect::<Vec<_>>()
        };
        assert_eq!(pick("4"), pick("4"));
        assert!(pick("4").iter().any(|x| x != &pick("4")[0]));
        std::fs::remove_file(&dir).unwrap();
    }
}
