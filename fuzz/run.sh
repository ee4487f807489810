#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 12) from a copy of its
# checked-in seed corpus, so new inputs never dirty the repository.
# A crash leaves its input in fuzz/artifacts/TARGET/ and fails the run.
#   bash fuzz/run.sh            # CI: about a minute in all
#   bash fuzz/run.sh 600        # ten minutes a target
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-12}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in $(cargo +nightly fuzz list); do
  mkdir -p "$work/$t" "artifacts/$t"
  cp -r "corpus/$t/." "$work/$t/" 2>/dev/null || true
  echo "== fuzz $t for ${secs}s"
  if ! cargo +nightly fuzz run "$t" "$work/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 \
      -artifact_prefix="artifacts/$t/" >"$work/$t.log" 2>&1; then
    tail -n 60 "$work/$t.log"
    echo "fuzz: $t failed; the input is in fuzz/artifacts/$t/"
    exit 1
  fi
  grep -E "^Done [0-9]+ runs" "$work/$t.log" || true
done
echo "fuzz: every target ran clean"
