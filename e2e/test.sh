#!/usr/bin/env bash
# Every test Silo has: formatting, lints, unit and integration tests, then the end-to-end tests
# against a real control plane and real PostgreSQL servers. Works on a fresh machine: installs
# Debian packages it needs and builds the pinned Kubernetes binaries (cached in ~/.cache/silo).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:/usr/local/go/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/silo/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
cd "$ROOT"

step() { echo "==> $*" >&2; }

step "dependencies"
e2e/scripts/install-deps.sh
step "cargo fmt --check"
cargo fmt --all --check
step "cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
step "unit and integration tests"
cargo test --locked --workspace --exclude silo-e2e
step "end-to-end tests"
e2e/run-tests.sh
