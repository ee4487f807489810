#!/usr/bin/env bash
# Interop suite: the checks that need packages beyond the Rust toolchain.
#
#   bash tests/interop/run.sh
#
# - builds target/release/sluice (cargo build --release) unless
#   SLUICE_BIN points at a binary;
# - makes a throw-away venv with prometheus_client (pinned);
# - when run as root with apt-get, installs Debian's `prometheus` package
#   for `promtool` (about 19 MB); if that fails the promtool check is
#   skipped with a message, not failed. SKIP_PROMTOOL=1 skips it;
# - starts sluice on 127.0.0.1:0 and runs tests/interop/metrics_check.py.
set -euo pipefail
cd "$(dirname "$0")/../.."

PROMETHEUS_CLIENT_VERSION=0.26.0

work=$(mktemp -d "${TMPDIR:-/tmp}/sluice-interop.XXXXXX")
server_pid=
cleanup() {
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== sluice binary"
if [[ -n "${SLUICE_BIN:-}" ]]; then
  bin=$SLUICE_BIN
else
  cargo build --release --bin sluice
  bin=${CARGO_TARGET_DIR:-target}/release/sluice
fi
[[ -x "$bin" ]] || { echo "no executable at $bin" >&2; exit 1; }

echo "== python venv with prometheus_client $PROMETHEUS_CLIENT_VERSION"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check \
  "prometheus_client==$PROMETHEUS_CLIENT_VERSION"

echo "== promtool"
promtool=
if [[ "${SKIP_PROMTOOL:-0}" == 1 ]]; then
  echo "skip: SKIP_PROMTOOL=1"
elif command -v promtool >/dev/null 2>&1; then
  promtool=$(command -v promtool)
elif [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  # Debian's prometheus package ships promtool; its service is not started
  # in a container without an init system.
  if apt-get update -qq >"$work/apt.log" 2>&1 &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      prometheus >>"$work/apt.log" 2>&1 &&
    command -v promtool >/dev/null 2>&1; then
    promtool=$(command -v promtool)
  else
    echo "skip: could not install Debian's prometheus package for promtool:"
    tail -n 5 "$work/apt.log" || true
  fi
else
  echo "skip: no promtool, and installing it needs root and apt-get"
fi
[[ -n "$promtool" ]] && "$promtool" --version 2>&1 | head -n 1

echo "== start sluice"
# The check relies on these: 3-token streams finish well within
# --max-stream-ms, a 200-token stream (4 s) hits it.
"$bin" --listen 127.0.0.1:0 --log-level warn \
  --sim-ttft-ms 0 --sim-itl-ms 20 --sim-tokens 200 --max-stream-ms 1000 \
  2>"$work/sluice.log" &
server_pid=$!
addr=
for _ in $(seq 1 100); do
  addr=$(sed -n 's/.*listening on http:\/\/\([^ ]*\).*/\1/p' "$work/sluice.log" | head -n 1)
  [[ -n "$addr" ]] && break
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "sluice exited at start:" >&2
    cat "$work/sluice.log" >&2
    exit 1
  fi
  sleep 0.1
done
if [[ -z "$addr" ]]; then
  echo "no 'listening on' line from sluice within 10 s:" >&2
  cat "$work/sluice.log" >&2
  exit 1
fi
echo "sluice at http://$addr (pid $server_pid)"

echo "== metrics"
args=(--url "http://$addr")
[[ -n "$promtool" ]] && args+=(--promtool "$promtool")
status=0
"$work/venv/bin/python" tests/interop/metrics_check.py "${args[@]}" || status=$?
if ! kill -0 "$server_pid" 2>/dev/null; then
  echo "sluice died during the checks:" >&2
  tail -n 20 "$work/sluice.log" >&2
  status=1
fi
if [[ $status != 0 ]]; then
  echo "== sluice log (last 20 lines)"
  tail -n 20 "$work/sluice.log" || true
fi
exit "$status"
