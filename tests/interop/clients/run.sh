#!/usr/bin/env bash
# Client interop suite: real clients against a real sluice over loopback.
#
#   bash tests/interop/clients/run.sh
#
# - the openai Python SDK (openai_check.py),
# - headless Chromium driven by Playwright, on sluice's demo page, same
#   origin, cross-origin with and without --cors-origin, and over HTTP/2
#   through nginx (browser_check.py),
# - nginx as a reverse proxy without `proxy_buffering off` (nginx.conf,
#   nginx_check.py), and the production config nginx-recommended.conf,
# - curl -N against both streaming endpoints (below).
#
# Installs what it needs: Debian's chromium, nginx-light, curl and openssl
# (apt-get, needs root; skipped when they are all there already) and a venv
# with pinned `openai` and `playwright` (PyPI playwright drives the system
# chromium through executable_path; `playwright install` is never run).
# Builds target/release/sluice with `cargo build --release`, unless
# SLUICE_BIN points at a binary. Everything listens on 127.0.0.1 only.
# Ends with `interop clients: N passed, M failed`; exits non-zero on any failure.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
cd "$root"

OPENAI_VERSION=3.54.0
PLAYWRIGHT_VERSION=1.65.2
VENV=${SLUICE_INTEROP_VENV:-/tmp/sluice-interop-clients-venv}
# Everything here is on loopback: never through a proxy.
export no_proxy=127.0.0.1,localhost NO_PROXY=127.0.0.1,localhost
export PYTHONDONTWRITEBYTECODE=1 # no __pycache__ in the work tree

t_start=$SECONDS
phase() { echo "== $* (t=$((SECONDS - t_start)) s)"; }

work=$(mktemp -d "${TMPDIR:-/tmp}/sluice-clients.XXXXXX")
chmod 755 "$work" # nginx workers (user nobody when run as root) read below it
pids=()
cleanup() {
  local i p left
  trap - INT TERM
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null || true
  done
  # Up to 3 s for them to go, then SIGKILL: never hang here.
  for i in $(seq 1 60); do
    left=0
    for p in "${pids[@]}"; do
      if kill -0 "$p" 2>/dev/null; then left=1; fi
    done
    ((left)) || break
    sleep 0.05
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

passed=0
failed=0

# ---------------------------------------------------------------- packages
phase "system packages"
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if ((${#need[@]})); then
  if [[ $(id -u) != 0 ]]; then
    echo "missing ${need[*]}: run as root (apt-get) or install them first" >&2
    exit 1
  fi
  echo "installing ${need[*]} (log: $work/apt.log)"
  if ! { apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium nginx-light curl openssl; } >"$work/apt.log" 2>&1; then
    tail -n 30 "$work/apt.log" >&2
    exit 1
  fi
else
  echo "chromium, nginx, curl and openssl already installed"
fi
chromium --version 2>/dev/null | head -n 1
nginx -v 2>&1
curl --version | head -n 1

phase "python venv ($VENV): openai==$OPENAI_VERSION playwright==$PLAYWRIGHT_VERSION"
stamp="openai==$OPENAI_VERSION playwright==$PLAYWRIGHT_VERSION"
if [[ -f "$VENV/.sluice-stamp" && "$(cat "$VENV/.sluice-stamp")" == "$stamp" ]] &&
  "$VENV/bin/python" -c 'import openai, playwright' 2>/dev/null; then
  echo "reusing the venv"
else
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "openai==$OPENAI_VERSION" "playwright==$PLAYWRIGHT_VERSION"
  echo "$stamp" >"$VENV/.sluice-stamp"
fi
py=$VENV/bin/python

# ------------------------------------------------------------------ sluice
phase "sluice binary"
if [[ -n "${SLUICE_BIN:-}" ]]; then
  bin=$SLUICE_BIN
else
  cargo build --release
  bin=${CARGO_TARGET_DIR:-$root/target}/release/sluice
fi
[[ -x "$bin" ]] || { echo "no executable at $bin" >&2; exit 1; }

# start_sluice VAR NAME ARGS...: starts sluice on 127.0.0.1:0, sets VAR to its HOST:PORT.
start_sluice() {
  local var=$1 name=$2 addr= i
  shift 2
  : >"$work/$name.log"
  "$bin" --listen 127.0.0.1:0 --log-level warn "$@" >/dev/null 2>"$work/$name.log" &
  pids+=($!)
  for i in $(seq 1 100); do
    addr=$(sed -n 's/.*listening on http:\/\/\([^ ]*\).*/\1/p' "$work/$name.log" 2>/dev/null | head -n 1 || true)
    [[ -n "$addr" ]] && break
    kill -0 "${pids[-1]}" 2>/dev/null || break
    sleep 0.05
  done
  if [[ -z "$addr" ]]; then
    echo "sluice $name did not start:" >&2
    cat "$work/$name.log" >&2
    exit 1
  fi
  printf -v "$var" '%s' "$addr"
  echo "sluice $name at http://$addr: $*"
}

free_port() {
  "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_http URL [CURL ARGS]: waits up to 5 s for a 200.
wait_http() {
  local url=$1 i
  shift
  for i in $(seq 1 100); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' "$@" "$url" || true) == 200 ]] && return 0
    kill -0 "${pids[-1]}" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

# start_nginx VAR NAME CONF: runs nginx in the foreground with config file
# CONF (placeholders __PREFIX__ and __LISTEN__ substituted here; the caller
# has substituted the rest), sets VAR to HOST:PORT. SCHEME may be https.
start_nginx() {
  local var=$1 name=$2 conf=$3 scheme=${4:-http} dir port try
  dir=$work/nginx-$name
  mkdir -p "$dir/tmp"
  chmod 755 "$dir" "$dir/tmp"
  for try in 1 2 3; do
    port=$(free_port)
    sed -e "s|__PREFIX__|$dir|g" -e "s|__LISTEN__|127.0.0.1:$port|g" "$conf" >"$dir/nginx.conf"
    nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" >"$dir/stdout.log" 2>&1 &
    pids+=($!)
    if wait_http "$scheme://127.0.0.1:$port/healthz" -k; then
      printf -v "$var" '%s' "127.0.0.1:$port"
      echo "nginx $name at $scheme://127.0.0.1:$port"
      return 0
    fi
    kill "${pids[-1]}" 2>/dev/null || true
    wait "${pids[-1]}" 2>/dev/null || true
    unset 'pids[-1]'
  done
  echo "nginx $name did not start:" >&2
  cat "$dir/stdout.log" "$dir/error.log" >&2 || true
  exit 1
}

# run_py SUITE SCRIPT ARGS...: runs a check script and adds up its RESULT line.
run_py() {
  local suite=$1 script=$2 log=$work/$1.out rc=0 res
  shift 2
  (cd "$here" && timeout 300 "$py" -u "$script" "$@") 2>&1 | tee "$log" || rc=$?
  res=$(sed -n 's/^RESULT \([0-9]*\) \([0-9]*\)$/\1 \2/p' "$log" | tail -n 1)
  if [[ -z "$res" ]]; then
    echo "FAIL $suite: $script ended without a result (exit $rc)"
    failed=$((failed + 1))
  else
    passed=$((passed + ${res% *}))
    failed=$((failed + ${res#* }))
  fi
}

phase "start sluice instances"
# A scripted OpenAI upstream for the SDK's tool-calling round trip.
: >"$work/fake.out"
"$py" -u "$here/fake_openai.py" >"$work/fake.out" 2>"$work/fake.log" &
pids+=($!)
FAKE=
for _ in $(seq 1 100); do
  FAKE=$(sed -n 's/^fake openai on \([^ ]*\).*/\1/p' "$work/fake.out" 2>/dev/null || true)
  [[ -n "$FAKE" ]] && break
  sleep 0.05
done
[[ -n "$FAKE" ]] || { echo "fake openai did not start" >&2; cat "$work/fake.log" >&2; exit 1; }
start_sluice A plain
start_sluice DEADLINE deadline --max-stream-ms 300 --sim-itl-ms 50
start_sluice NOSTREAM nostream --no-streaming
start_sluice TOOLS tools --backend openai --upstream-url "http://$FAKE/v1"

# The demo page served from another origin: the same HTML, from a plain
# python http.server on another port of 127.0.0.1.
mkdir -p "$work/page"
curl -sSf "http://$A/" -o "$work/page/index.html"
: >"$work/page.out"
"$py" -u -m http.server 0 --bind 127.0.0.1 --directory "$work/page" >"$work/page.out" 2>"$work/page.log" &
pids+=($!)
page_port=
for _ in $(seq 1 100); do
  page_port=$(sed -n 's/^Serving HTTP on [^ ]* port \([0-9]*\).*/\1/p' "$work/page.out" 2>/dev/null || true)
  [[ -n "$page_port" ]] && break
  sleep 0.05
done
[[ -n "$page_port" ]] || { echo "page server did not start" >&2; cat "$work/page.log" >&2; exit 1; }
page_origin=http://127.0.0.1:$page_port
echo "demo page copy at $page_origin/"

start_sluice BROWSER browser --sim-itl-ms 50 --sim-tokens 500 --cors-origin "$page_origin"
start_sluice PROXIED proxied --sim-itl-ms 100 --sim-tokens 500
start_sluice HB heartbeat --heartbeat-ms 100 --sim-ttft-ms 600
start_sluice BP backpressure --sim-itl-ms 0 --sim-ttft-ms 0 --sim-tokens 200000 \
  --max-tokens-limit 200000 --write-timeout-ms 1000
start_sluice RESUME resume --sim-itl-ms 20 --sim-tokens 80 --resume-window-ms 10000

# A flaky link in front of the resume instance: it resets the first two
# new streams mid-answer (one for the EventSource check, one for the demo
# page's).
: >"$work/cut.out"
"$py" -u "$here/cut_proxy.py" --upstream "$RESUME" --cut-bytes 1500 --cuts 2 \
  >"$work/cut.out" 2>"$work/cut.log" &
pids+=($!)
CUT=
for _ in $(seq 1 100); do
  CUT=$(sed -n 's/^cut proxy on \([^ ]*\).*/\1/p' "$work/cut.out" 2>/dev/null || true)
  [[ -n "$CUT" ]] && break
  sleep 0.05
done
[[ -n "$CUT" ]] || { echo "cut proxy did not start" >&2; cat "$work/cut.log" >&2; exit 1; }
echo "cut proxy at http://$CUT in front of sluice resume"

phase "start nginx"
sed "s|__UPSTREAM__|$PROXIED|" "$here/nginx.conf" >"$work/nginx-proxied.tmpl"
start_nginx NGINX proxied "$work/nginx-proxied.tmpl"
sed "s|__UPSTREAM__|$HB|" "$here/nginx.conf" >"$work/nginx-hb.tmpl"
start_nginx NGINX_HB heartbeat "$work/nginx-hb.tmpl"
sed "s|__UPSTREAM__|$BP|" "$here/nginx.conf" >"$work/nginx-bp.tmpl"
start_nginx NGINX_BP backpressure "$work/nginx-bp.tmpl"
# Control: the same config told to ignore X-Accel-Buffering, to show that
# the header is what makes nginx pass a slow client's backpressure on.
sed -e "s|__UPSTREAM__|$BP|" \
  -e 's|^\( *\)proxy_set_header Connection "";.*|&\n\1proxy_ignore_headers X-Accel-Buffering;|' \
  "$here/nginx.conf" >"$work/nginx-control.tmpl"
grep -q 'proxy_ignore_headers X-Accel-Buffering' "$work/nginx-control.tmpl"
start_nginx NGINX_CONTROL control "$work/nginx-control.tmpl"

# The production config: TLS + HTTP/2 towards the client, with a throw-away
# self-signed certificate, in front of the browser instance.
tls=$work/tls
mkdir -p "$tls"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=127.0.0.1" \
  -addext "subjectAltName=IP:127.0.0.1" \
  -keyout "$tls/key.pem" -out "$tls/cert.pem" >"$tls/openssl.log" 2>&1
nginx_version=$(nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
{
  echo "daemon off; worker_processes 1; pid __PREFIX__/nginx.pid; error_log __PREFIX__/error.log warn;"
  echo "events { worker_connections 1024; }"
  echo "http {"
  echo "  access_log __PREFIX__/access.log;"
  for t in client_body proxy fastcgi uwsgi scgi; do echo "  ${t}_temp_path __PREFIX__/tmp/$t;"; done
  sed -e "s|127.0.0.1:8080;|$BROWSER;|" \
    -e "s|listen 443 ssl;|listen __LISTEN__ ssl;|" \
    -e "s|/etc/ssl/certs/llm.example.com.fullchain.pem|$tls/cert.pem|" \
    -e "s|/etc/ssl/private/llm.example.com.key|$tls/key.pem|" \
    "$here/nginx-recommended.conf"
  echo "}"
} >"$work/nginx-h2.tmpl"
# `http2 on;` is nginx >= 1.25.1; older ones take `listen ... http2`.
if [[ $(printf '%s\n' "$nginx_version" 1.25.1 | sort -V | head -n 1) != 1.25.1 ]]; then
  echo "nginx $nginx_version < 1.25.1: using 'listen ... ssl http2' for 'http2 on'"
  sed -i -e '/^ *http2 on;/d' -e 's|listen __LISTEN__ ssl;|listen __LISTEN__ ssl http2;|' "$work/nginx-h2.tmpl"
fi
start_nginx NGINX_H2 h2 "$work/nginx-h2.tmpl" https

# ------------------------------------------------------------------ checks
phase "openai SDK"
run_py openai openai_check.py --addr "$A" --deadline-addr "$DEADLINE" --nostream-addr "$NOSTREAM" \
  --tools-addr "$TOOLS"

phase "headless chromium"
run_py browser browser_check.py --addr "$BROWSER" --page-origin "$page_origin" \
  --nocors-addr "$A" --h2-url "https://$NGINX_H2/" --cut-addr "$CUT" --resume-addr "$RESUME"

phase "nginx"
run_py nginx nginx_check.py --direct "$PROXIED" --nginx "$NGINX" \
  --hb-direct "$HB" --hb-nginx "$NGINX_HB" \
  --bp-direct "$BP" --bp-nginx "$NGINX_BP" --bp-control "$NGINX_CONTROL" --h2 "$NGINX_H2"

phase "curl -N"
ok() { passed=$((passed + 1)); echo "PASS curl: $*"; }
bad() { failed=$((failed + 1)); echo "FAIL curl: $*"; }
# curl's default Content-Type (form-urlencoded) on purpose: the body is JSON anyway.
native=$(curl -sS -N --max-time 10 "http://$A/v1/chat/stream" -d '{"prompt":"curl check","max_tokens":5}' || true)
printf '%s\n' "$native" | sed 's/^/  | /'
ntok=$(grep -c '^event: token$' <<<"$native" || true)
last=$(grep '^event: ' <<<"$native" | tail -n 1 || true)
if [[ $ntok == 5 && $last == "event: done" ]] && grep -q '^data: {"finish_reason":"length"' <<<"$native"; then
  ok "native POST: 5 token events, then done (finish_reason length)"
else
  bad "native POST: $ntok token events, last '$last'"
fi
native_get=$(curl -sS -N --max-time 10 -G "http://$A/v1/chat/stream" \
  --data-urlencode "prompt=curl check" --data-urlencode "max_tokens=5" || true)
toks_post=$(grep '^data: {"t"' <<<"$native" || true)
toks_get=$(grep '^data: {"t"' <<<"$native_get" || true)
if [[ -n "$toks_post" && "$toks_get" == "$toks_post" ]]; then
  ok "native GET ?prompt=: the same token events as the POST"
else
  bad "native GET differs from POST"
fi
chat=$(curl -sS -N --max-time 10 "http://$A/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model":"sluice-sim","messages":[{"role":"user","content":"curl check"}],"max_tokens":5,"stream":true}' || true)
printf '%s\n' "$chat" | sed 's/^/  | /' | cut -c1-160
nchunk=$(grep -c '^data: {.*"object":"chat.completion.chunk"' <<<"$chat" || true)
lastdata=$(grep '^data: ' <<<"$chat" | tail -n 1 || true)
content=$( (grep '^data: {' <<<"$chat" || true) | sed 's/^data: //' |
  "$py" -c 'import json,sys; print("".join((c["choices"][0]["delta"].get("content") or "") for c in map(json.loads, sys.stdin) if c.get("choices")))' || true)
want=$(sed 's/^data: //' <<<"$toks_post" |
  "$py" -c 'import json,sys; print("".join(json.loads(l)["t"] for l in sys.stdin if l.strip()))' || true)
if [[ $nchunk == 7 && $lastdata == "data: [DONE]" && -n "$want" && "$content" == "$want" ]]; then
  ok "chat completions stream: role + 5 content + finish chunks, then [DONE]; text = native ('$content')"
else
  bad "chat completions stream: $nchunk chunks, last '$lastdata', text '$content' vs native '$want'"
fi

# ------------------------------------------------------------------ start-up checks
phase "start-up checks"
# An upstream URL without its /v1 base, and a model the upstream does not
# list: sluice runs, and says what is wrong.
start_sluice NOV1 nov1 --upstream-url "http://$FAKE"
start_sluice NOMODEL nomodel --upstream-url "http://$FAKE/v1" --upstream-model no-such-model
wait_log() { # wait_log NAME TEXT: up to 5 s for TEXT in NAME's log
  local i
  for i in $(seq 1 100); do grep -q "$2" "$work/$1.log" 2>/dev/null && return 0; sleep 0.05; done
  return 1
}
if wait_log nov1 "probably missing its API base"; then
  ok "--upstream-url without /v1: a start-up warning says so (GET …/models answered 404)"
else
  bad "--upstream-url without /v1: no warning"; tail -n 5 "$work/nov1.log"
fi
if wait_log nomodel 'does not list the model "no-such-model"'; then
  ok "--upstream-model the upstream does not list: a start-up warning names it"
else
  bad "--upstream-model unknown: no warning"; tail -n 5 "$work/nomodel.log"
fi
set +e
out=$("$bin" --listen 127.0.0.1:0 --backend sim --upstream-url "http://$FAKE/v1" 2>&1)
code=$?
set -e
if [[ $code == 2 && $out == *"--backend openai"* ]]; then
  ok "--upstream-url with --backend sim: exit 2, the message names --backend"
else
  bad "--upstream-url with --backend sim: exit $code, '$out'"
fi

# ------------------------------------------------------------------ end
for name in plain deadline nostream browser proxied heartbeat backpressure resume tools nov1 nomodel; do
  if grep -qiE 'panic|thread .* panicked' "$work/$name.log"; then
    bad "sluice $name log shows a panic"
    tail -n 20 "$work/$name.log"
  fi
done
alive=1
for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || alive=0; done
if ((alive)); then ok "every sluice, nginx and page server still running at the end"; else bad "a server process died during the checks"; fi

phase "done"
echo "interop clients: $passed passed, $failed failed"
((failed == 0))
