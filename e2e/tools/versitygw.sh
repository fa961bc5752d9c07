#!/usr/bin/env bash
# Builds versitygw (github.com/versity/versitygw, Apache-2.0), an S3 gateway that the e2e tests use
# as their S3-compatible store, from the Go module proxy into ~/.cache/silo/versitygw/<version>/bin.
# Built once; a second run builds nothing. Prints the binary's path on stdout.
set -euo pipefail

VERSION="${SILO_VERSITYGW_VERSION:-v1.8.0}"
CACHE="${SILO_CACHE:-$HOME/.cache/silo}"
BIN="$CACHE/versitygw/$VERSION/bin"
if [[ -x "$BIN/versitygw" ]]; then echo "$BIN/versitygw"; exit 0; fi

command -v go >/dev/null || { echo "versitygw.sh: go is required" >&2; exit 1; }
mkdir -p "$BIN"
echo "versitygw.sh: building versitygw $VERSION (about 2 minutes, once)" >&2
# GOBIN makes `go install` put the binary straight into the cache; -trimpath and no symbol tables
# as for the Kubernetes binaries.
GOTOOLCHAIN=local CGO_ENABLED=0 GOBIN="$BIN.tmp" \
  go install -trimpath -ldflags "-s -w" "github.com/versity/versitygw/cmd/versitygw@$VERSION" >&2
mv "$BIN.tmp/versitygw" "$BIN/versitygw"
rmdir "$BIN.tmp"
echo "$BIN/versitygw"
