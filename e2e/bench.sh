#!/usr/bin/env bash
# The provisioning benchmark (not a test): a local control plane, two PostgreSQL servers, the
# release-built controller; prints silo vs. the raw SQL floor. Arguments go to the benchmark,
# e.g. `e2e/bench.sh --tenants 500`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:/usr/local/go/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/silo/target}"
"$ROOT/e2e/scripts/install-deps.sh"
# shellcheck source=scripts/harness.sh
source "$ROOT/e2e/scripts/harness.sh"
# No node: the benchmark runs no pods, and the control plane stays on loopback.
export SILO_E2E_NODE=0
cargo build --quiet --release -p silo-controller -p silo-router -p silo-e2e --manifest-path "$ROOT/Cargo.toml"
export SILO_CONTROLLER_BIN="$CARGO_TARGET_DIR/release/silo-controller"
export SILO_ROUTER_BIN="$CARGO_TARGET_DIR/release/silo-router"

# PostgreSQL data on tmpfs when there is room: CREATE DATABASE copies the 7 MB template each time,
# and a VM's disk makes that the noisiest part of the run; in memory, what remains is the work the
# two sides actually do. SILO_BENCH_DIR overrides.
BASE="${SILO_BENCH_DIR:-}"
if [[ -z "$BASE" ]]; then
  BASE=/tmp
  avail_kb="$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')"
  [[ -n "$avail_kb" && "$avail_kb" -gt 12000000 ]] && BASE=/dev/shm
fi
WORK="$(mktemp -d "$BASE/silo-bench.XXXXXX")"
chmod 755 "$WORK"
export SILO_E2E_DIR="$WORK"
cleanup() {
  for pid in "$WORK"/pg-*/data/postmaster.pid; do
    [[ -f "$pid" ]] && kill -9 "$(head -1 "$pid")" 2>/dev/null || true
  done
  harness_down "$WORK" || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
harness_up "$WORK"
echo "bench.sh: PostgreSQL data under $WORK" >&2
"$CARGO_TARGET_DIR/release/bench_provision" "$@"
