#!/usr/bin/env bash
# The provisioning benchmark (not a test): a local control plane, two PostgreSQL servers, the
# release-built controller; prints silo vs. the raw SQL floor and the API writes alone, then a
# controller restart with the fleet Ready. Each N of `--tenants` (comma-separated; `--fleet` is
# 500,1000,2000) runs on a fresh control plane and fresh servers, one after the other, and a
# table comparing them per tenant ends the run. Other arguments go to bench_provision, e.g.
# `e2e/bench.sh --tenants 500`, `e2e/bench.sh --fleet --ddl-concurrency 4`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:/usr/local/go/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/silo/target}"

COUNTS=500
ARGS=()
while (($#)); do
  case "$1" in
    --fleet) COUNTS=500,1000,2000 ;;
    --tenants) COUNTS="${2:?--tenants needs a value}"; shift ;;
    --tenants=*) COUNTS="${1#*=}" ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
IFS=, read -ra COUNTS <<<"$COUNTS"

"$ROOT/e2e/scripts/install-deps.sh"
# shellcheck source=scripts/harness.sh
source "$ROOT/e2e/scripts/harness.sh"
# No node: the benchmark runs no pods, and the control plane stays on loopback.
export SILO_E2E_NODE=0
cargo build --quiet --release -p silo-controller -p silo-router -p silo-e2e --manifest-path "$ROOT/Cargo.toml"
RESULTS="$(mktemp -d /tmp/silo-bench-results.XXXXXX)"
# The run's own copies: the target folder is shared, and another worktree's build would otherwise
# swap the controller between two N.
mkdir "$RESULTS/bin"
for b in silo-controller silo-router bench_provision; do cp "$CARGO_TARGET_DIR/release/$b" "$RESULTS/bin/"; done
export SILO_CONTROLLER_BIN="$RESULTS/bin/silo-controller"
export SILO_ROUTER_BIN="$RESULTS/bin/silo-router"
BENCH="$RESULTS/bin/bench_provision"

# Where one N's PostgreSQL data goes. On tmpfs when there is room: CREATE DATABASE copies the
# 7 MB template each time, and a VM's disk makes that the noisiest part of the run; in memory,
# what remains is the work the two sides actually do. The run holds up to two sets of N databases
# (silo's and the floor's), so it needs about 16 MB per tenant, in /dev/shm and in free memory
# alike, plus 4 GB to spare; 2,000 tenants and more always go to disk. SILO_BENCH_DIR overrides.
bench_base() {
  local n="$1" need_kb shm_kb mem_kb
  if [[ -n "${SILO_BENCH_DIR:-}" ]]; then echo "$SILO_BENCH_DIR"; return; fi
  need_kb=$((n * 16 * 1024 + 4 * 1024 * 1024))
  shm_kb="$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')"
  mem_kb="$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)"
  if ((n < 2000)) && [[ -n "$shm_kb" ]] && ((shm_kb > need_kb && mem_kb > need_kb)); then
    echo /dev/shm
  else
    echo /var/tmp
  fi
}

WORK=""
cleanup() {
  [[ -n "$WORK" && -d "$WORK" ]] || return 0
  for pid in "$WORK"/pg-*/data/postmaster.pid; do
    [[ -f "$pid" ]] && kill -9 "$(head -1 "$pid")" 2>/dev/null || true
  done
  harness_down "$WORK" || true
  rm -rf "$WORK"
  WORK=""
}
trap 'cleanup; rm -rf "$RESULTS/bin"' EXIT INT TERM

for n in "${COUNTS[@]}"; do
  WORK="$(mktemp -d "$(bench_base "$n")/silo-bench.XXXXXX")"
  chmod 755 "$WORK"
  export SILO_E2E_DIR="$WORK"
  harness_up "$WORK"
  echo "bench.sh: $n tenants, PostgreSQL data under $WORK ($(df -h --output=avail "$WORK" | tail -1 | tr -d ' ') free)" >&2
  "$BENCH" --tenants "$n" --results "$RESULTS/$n.json" "${ARGS[@]}"
  cleanup
done

if ((${#COUNTS[@]} > 1)); then
  "$BENCH" --summary "$RESULTS"/*.json
  echo "bench.sh: figures kept in $RESULTS (\`bench_provision --summary $RESULTS/*.json\` prints the table again)" >&2
else
  rm -rf "$RESULTS"
fi
