#!/usr/bin/env bash
# Runs the end-to-end tests: builds the pinned Kubernetes binaries (cached), starts a cluster
# with a real node (e2e/scripts/cluster.sh; or uses $KUBECONFIG when SILO_E2E_USE_KUBECONFIG=1),
# installs the CRDs, starts an S3-compatible store (e2e/scripts/s3.sh), builds the controller, router
# and job runner and the silo image for the node, applies the
# chart's RBAC for the local controller and router to run under, and runs `cargo test -p silo-e2e`.
# Everything it starts is stopped on exit.
# Extra arguments go to the test binary, e.g. `e2e/run-tests.sh a_tenant`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/silo/target}"
# shellcheck source=scripts/harness.sh
source "$ROOT/e2e/scripts/harness.sh"

WORK="$(mktemp -d /tmp/silo-e2e.XXXXXX)"
chmod 755 "$WORK"
export SILO_E2E_DIR="$WORK"
cleanup() {
  local rc=$?
  # Any PostgreSQL a crashed test left behind.
  for pid in "$WORK"/pg-*/data/postmaster.pid; do
    [[ -f "$pid" ]] && kill -9 "$(head -1 "$pid")" 2>/dev/null || true
  done
  if [[ $rc != 0 ]]; then
    mkdir -p "$CARGO_TARGET_DIR/e2e-logs"
    cp "$WORK"/*.log "$WORK"/cluster/logs/*.log "$CARGO_TARGET_DIR/e2e-logs/" 2>/dev/null || true
    echo "run-tests.sh: logs of the failed run are in $CARGO_TARGET_DIR/e2e-logs" >&2
  fi
  harness_down "$WORK" || rc=1
  "$ROOT/e2e/scripts/s3.sh" down "$WORK/s3" || rc=1
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT INT TERM

harness_up "$WORK"
# The S3-compatible store of the runner tests: versitygw on loopback (built once, cached).
"$ROOT/e2e/scripts/s3.sh" up "$WORK/s3"
# shellcheck disable=SC1091
source "$WORK/s3/env"
cargo build --quiet -p silo-controller -p silo-router --manifest-path "$ROOT/Cargo.toml"
export SILO_CONTROLLER_BIN="$CARGO_TARGET_DIR/debug/silo-controller"
export SILO_RUNNER_BIN="$CARGO_TARGET_DIR/debug/silo"
export SILO_ROUTER_BIN="$CARGO_TARGET_DIR/debug/silo-router"
if [[ -f "$WORK/cluster/node.enabled" ]]; then
  "$ROOT/e2e/scripts/images.sh" silo "$WORK/silo-image.tar" "$CARGO_TARGET_DIR/debug" e2e
  "$ROOT/e2e/scripts/node.sh" import "$WORK/cluster" "$WORK/silo-image.tar" silo
  export SILO_E2E_IMAGE=localhost/silo:e2e
  # The example shop that SchemaRollouts migrate, at each version; rebuilt when it changes.
  shop_key="$(cat "$ROOT/e2e/scripts/images.sh" "$ROOT"/examples/django/Dockerfile \
    $(find "$ROOT/examples/django" -name '*.py' -o -name '*.sh' | sort) | sha256sum | cut -c1-16)"
  shop_dir="$HOME/.cache/silo/images/shop-$shop_key"
  [[ -f "$shop_dir/shop-v3.tar" ]] || "$ROOT/e2e/scripts/images.sh" shop "$shop_dir" v1 v2 v3
  for v in v1 v2 v3; do "$ROOT/e2e/scripts/node.sh" import "$WORK/cluster" "$shop_dir/shop-$v.tar" shop; done
  export SILO_E2E_SHOP_IMAGE=localhost/shop
fi
export SILO_PYTHON="${SILO_PYTHON:-$HOME/.cache/silo/venv/bin/python}"
cargo test --manifest-path "$ROOT/Cargo.toml" -p silo-e2e -- "$@"
