#!/usr/bin/env bash
# Several instances sharing resume and stop through a real Redis.
#
#   bash tests/interop/redis/run.sh
#
# Installs Debian's redis-server and nginx-light when missing (apt-get, needs root), builds
# target/release/sluice with `cargo build --release` unless SLUICE_BIN
# points at a binary, and runs redis_check.py: three sluice instances and
# one redis-server, and nginx in front of two of them, all on 127.0.0.1 ports picked at run time. Ends with
# `interop redis: N passed, M failed`; exits non-zero on any failure.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
cd "$root"
export PYTHONDONTWRITEBYTECODE=1

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
if ((${#need[@]})); then
  if [[ $(id -u) != 0 ]]; then
    echo "missing ${need[*]}: run as root (apt-get) or install them first" >&2
    exit 1
  fi
  echo "installing ${need[*]}"
  { apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } \
    >/tmp/sluice-redis-apt.log 2>&1 || { tail -n 30 /tmp/sluice-redis-apt.log >&2; exit 1; }
fi
redis-server --version
nginx -v 2>&1

if [[ -n "${SLUICE_BIN:-}" ]]; then
  bin=$SLUICE_BIN
else
  cargo build --release
  bin=${CARGO_TARGET_DIR:-$root/target}/release/sluice
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/sluice-redis.XXXXXX")
trap 'rm -rf "$work"' EXIT
# The check stops everything it starts; the timeout is a last resort.
timeout 300 python3 "$here/redis_check.py" "$bin" "$(command -v redis-server)" "$(command -v nginx)" "$work"
