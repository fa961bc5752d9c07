#!/usr/bin/env bash
# An S3-compatible store for the tests: versitygw (built by e2e/tools/versitygw.sh) with its POSIX
# backend, on loopback at a free port, with generated root credentials and one bucket.
#   s3.sh up DIR     starts it; objects under DIR/data, its log in DIR/versitygw.log, and DIR/env
#                    with SILO_E2E_S3_ENDPOINT, SILO_E2E_S3_REGION, SILO_E2E_S3_BUCKET,
#                    SILO_E2E_S3_ACCESS_KEY, SILO_E2E_S3_SECRET_KEY and SILO_E2E_S3_DATA
#   s3.sh down DIR   stops it (by the PID it recorded) and removes DIR
# SILO_E2E_S3_HOST changes the listening address (default 127.0.0.1).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cmd="${1:-}" dir="${2:-}"
[[ -n "$cmd" && -n "$dir" ]] || { echo "usage: s3.sh up|down DIR" >&2; exit 2; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

case "$cmd" in
up)
  bin="$("$ROOT/e2e/tools/versitygw.sh")"
  host="${SILO_E2E_S3_HOST:-127.0.0.1}"
  mkdir -p "$dir/data" "$dir/sidecar"
  port="$(free_port)"
  access="silo$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  secret="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  bucket=silo-e2e region=us-east-1
  # The credentials go in through the environment, not the command line.
  ROOT_ACCESS_KEY="$access" ROOT_SECRET_KEY="$secret" VGW_REGION="$region" \
    setsid "$bin" --port "$host:$port" posix --sidecar "$dir/sidecar" "$dir/data" \
    >"$dir/versitygw.log" 2>&1 </dev/null &
  echo $! >"$dir/pid"
  endpoint="http://$host:$port"
  for _ in $(seq 100); do
    # Anonymous requests get 403 once it serves.
    code="$(curl -s -o /dev/null -w '%{http_code}' "$endpoint/" || true)"
    [[ "$code" != 000 ]] && break
    kill -0 "$(cat "$dir/pid")" 2>/dev/null || { cat "$dir/versitygw.log" >&2; echo "s3.sh: versitygw exited" >&2; exit 1; }
    sleep 0.1
  done
  # The secret reaches curl on stdin (-K -), not on its command line.
  printf 'user = "%s:%s"\n' "$access" "$secret" |
    curl -sf -K - --aws-sigv4 "aws:amz:$region:s3" -X PUT \
      -H "x-amz-content-sha256: $(printf '' | sha256sum | cut -d' ' -f1)" "$endpoint/$bucket" >/dev/null \
    || { cat "$dir/versitygw.log" >&2; echo "s3.sh: creating bucket $bucket failed" >&2; exit 1; }
  umask 077
  cat >"$dir/env" <<ENV
export SILO_E2E_S3_ENDPOINT=$endpoint
export SILO_E2E_S3_REGION=$region
export SILO_E2E_S3_BUCKET=$bucket
export SILO_E2E_S3_ACCESS_KEY=$access
export SILO_E2E_S3_SECRET_KEY=$secret
export SILO_E2E_S3_DATA=$dir/data
ENV
  echo "s3.sh: versitygw serving $endpoint (bucket $bucket)" >&2
  ;;
down)
  if [[ -f "$dir/pid" ]]; then
    pid="$(cat "$dir/pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -rf "$dir"
  ;;
*) echo "usage: s3.sh up|down DIR" >&2; exit 2 ;;
esac
