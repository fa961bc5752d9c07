#!/usr/bin/env bash
# The SchemaRollout benchmark (not a test): a cluster with the e2e node (the migration Jobs run as
# pods), two PostgreSQL servers, the release-built controller, the example shop's image; N tenants,
# then one rollout whose migration sleeps T seconds. Prints the wall time against the ideal
# ceil(N / maxConcurrent) * T and where the difference went. Arguments go to the benchmark, e.g.
# `e2e/bench-rollout.sh --tenants 20 --seconds 3`. Needs root (the node), and the node is one per
# machine: run it as `flock /tmp/silo-node.lock e2e/bench-rollout.sh`, like the e2e tests.
# The logs of the last run (controller, cluster) are kept in $CARGO_TARGET_DIR/bench-rollout-logs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:/usr/local/go/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/silo/target}"
if [[ "$(id -u)" != 0 ]]; then
  echo "bench-rollout.sh: the migration Jobs run on the e2e node, which needs root" >&2
  exit 1
fi
"$ROOT/e2e/scripts/install-deps.sh"
# shellcheck source=scripts/harness.sh
source "$ROOT/e2e/scripts/harness.sh"
export SILO_E2E_NODE=1
cargo build --quiet --release -p silo-controller -p silo-router -p silo-e2e --manifest-path "$ROOT/Cargo.toml"
export SILO_CONTROLLER_BIN="$CARGO_TARGET_DIR/release/silo-controller"
export SILO_ROUTER_BIN="$CARGO_TARGET_DIR/release/silo-router"

# The example shop's image, built once per change of it (the same cache as run-tests.sh).
shop_key="$(cat "$ROOT/e2e/scripts/images.sh" "$ROOT"/examples/django/Dockerfile \
  $(find "$ROOT/examples/django" -name '*.py' -o -name '*.sh' | sort) | sha256sum | cut -c1-16)"
shop_dir="$HOME/.cache/silo/images/shop-$shop_key"
[[ -f "$shop_dir/shop-v1.tar" ]] || "$ROOT/e2e/scripts/images.sh" shop "$shop_dir" v1 v2 v3

WORK="$(mktemp -d /tmp/silo-bench-rollout.XXXXXX)"
chmod 755 "$WORK"
export SILO_E2E_DIR="$WORK"
LOGS="$CARGO_TARGET_DIR/bench-rollout-logs"
rm -rf "$LOGS"
mkdir -p "$LOGS"
cleanup() {
  local rc=$?
  cp "$WORK"/*.log "$WORK"/cluster/logs/*.log "$LOGS/" 2>/dev/null || true
  for pid in "$WORK"/pg-*/data/postmaster.pid; do
    [[ -f "$pid" ]] && kill -9 "$(head -1 "$pid")" 2>/dev/null || true
  done
  harness_down "$WORK" || rc=1
  rm -rf "$WORK"
  echo "bench-rollout.sh: logs of the run are in $LOGS" >&2
  exit "$rc"
}
trap cleanup EXIT INT TERM
harness_up "$WORK"
[[ -f "$WORK/cluster/node.enabled" ]] || { echo "bench-rollout.sh: the cluster has no node" >&2; exit 1; }
"$ROOT/e2e/scripts/node.sh" import "$WORK/cluster" "$shop_dir/shop-v1.tar" shop
export SILO_E2E_SHOP_IMAGE=localhost/shop
"$CARGO_TARGET_DIR/release/bench_rollout" "$@"
