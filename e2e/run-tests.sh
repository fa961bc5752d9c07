#!/usr/bin/env bash
# Runs the end-to-end tests: builds the pinned Kubernetes binaries (cached), starts a control
# plane on loopback (or uses $KUBECONFIG when SILO_E2E_USE_KUBECONFIG=1), installs the CRDs, builds
# the controller, and runs `cargo test -p silo-e2e`. Everything it starts is stopped on exit.
# Extra arguments go to the test binary, e.g. `e2e/run-tests.sh a_tenant`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/silo/target}"
BIN="$("$ROOT/e2e/tools/build.sh")"
export SILO_KUBECTL="$BIN/kubectl"

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
  "$ROOT/e2e/scripts/cluster.sh" down "$WORK/cluster" || true
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT INT TERM

if [[ "${SILO_E2E_USE_KUBECONFIG:-0}" != 1 ]]; then
  "$ROOT/e2e/scripts/cluster.sh" up "$WORK/cluster"
  export KUBECONFIG="$WORK/cluster/kubeconfig"
fi
"$SILO_KUBECTL" apply -f "$ROOT/charts/silo/files/crds/" >/dev/null
"$SILO_KUBECTL" wait --for condition=established --timeout=60s crd/tenants.silo.dev crd/databaseservers.silo.dev >/dev/null

cargo build --quiet -p silo-controller -p silo-router --manifest-path "$ROOT/Cargo.toml"
export SILO_CONTROLLER_BIN="$CARGO_TARGET_DIR/debug/silo-controller"
export SILO_ROUTER_BIN="$CARGO_TARGET_DIR/debug/silo-router"
export SILO_PYTHON="${SILO_PYTHON:-$HOME/.cache/silo/venv/bin/python}"
cargo test --manifest-path "$ROOT/Cargo.toml" -p silo-e2e -- "$@"
