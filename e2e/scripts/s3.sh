#!/usr/bin/env bash
# An S3-compatible store for the tests: versitygw (built by e2e/tools/versitygw.sh) with its POSIX
# backend, on loopback at a free port, with generated root credentials and one bucket.
#   s3.sh up DIR     starts it; objects under DIR/data, its log in DIR/versitygw.log, and DIR/env
#                    with SILO_E2E_S3_ENDPOINT, SILO_E2E_S3_REGION, SILO_E2E_S3_BUCKET,
#                    SILO_E2E_S3_ACCESS_KEY, SILO_E2E_S3_SECRET_KEY and SILO_E2E_S3_DATA
#   s3.sh stop DIR   stops it and keeps its objects, address and credentials (an unreachable store)
#   s3.sh start DIR  starts it again as it was
#   s3.sh down DIR   stops it (by the PID it recorded) and removes DIR
# SILO_E2E_S3_HOST changes the listening address (default 127.0.0.1).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cmd="${1:-}" dir="${2:-}"
[[ -n "$cmd" && -n "$dir" ]] || { echo "usage: s3.sh up|stop|start|down DIR" >&2; exit 2; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# serve DIR HOST PORT ACCESS SECRET REGION: versitygw in the background until it answers.
serve() {
  local dir="$1" host="$2" port="$3" access="$4" secret="$5" region="$6" bin endpoint code
  bin="$("$ROOT/e2e/tools/versitygw.sh")"
  # The credentials go in through the environment, not the command line.
  ROOT_ACCESS_KEY="$access" ROOT_SECRET_KEY="$secret" VGW_REGION="$region" \
    setsid "$bin" --port "$host:$port" posix --sidecar "$dir/sidecar" "$dir/data" \
    >>"$dir/versitygw.log" 2>&1 </dev/null &
  echo $! >"$dir/pid"
  endpoint="http://$host:$port"
  for _ in $(seq 100); do
    # Anonymous requests get 403 once it serves.
    code="$(curl -s -o /dev/null -w '%{http_code}' "$endpoint/" || true)"
    [[ "$code" != 000 ]] && return 0
    kill -0 "$(cat "$dir/pid")" 2>/dev/null || { cat "$dir/versitygw.log" >&2; echo "s3.sh: versitygw exited" >&2; exit 1; }
    sleep 0.1
  done
  echo "s3.sh: versitygw did not answer on $endpoint" >&2
  exit 1
}

stop() {
  local dir="$1" pid
  [[ -f "$dir/pid" ]] || return 0
  pid="$(cat "$dir/pid")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$dir/pid"
}

case "$cmd" in
up)
  host="${SILO_E2E_S3_HOST:-127.0.0.1}"
  mkdir -p "$dir/data" "$dir/sidecar"
  port="$(free_port)"
  access="silo$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  secret="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  bucket=silo-e2e region=us-east-1
  serve "$dir" "$host" "$port" "$access" "$secret" "$region"
  endpoint="http://$host:$port"
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
export SILO_E2E_S3_HOST=$host
export SILO_E2E_S3_PORT=$port
ENV
  echo "s3.sh: versitygw serving $endpoint (bucket $bucket)" >&2
  ;;
stop)
  stop "$dir"
  ;;
start)
  # shellcheck disable=SC1091
  source "$dir/env"
  [[ -f "$dir/pid" ]] && kill -0 "$(cat "$dir/pid")" 2>/dev/null && exit 0
  serve "$dir" "$SILO_E2E_S3_HOST" "$SILO_E2E_S3_PORT" "$SILO_E2E_S3_ACCESS_KEY" \
    "$SILO_E2E_S3_SECRET_KEY" "$SILO_E2E_S3_REGION"
  ;;
down)
  stop "$dir"
  rm -rf "$dir"
  ;;
*) echo "usage: s3.sh up|stop|start|down DIR" >&2; exit 2 ;;
esac
