#!/usr/bin/env bash
# The Silo demo: a local control plane, two PostgreSQL servers, the controller, the example tenants,
# and a query made with a tenant's credentials Secret. Ctrl-C stops and removes everything.
# SILO_DEMO_EXIT=1 exits after the query instead of waiting.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:/usr/local/go/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/silo/target}"
say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

"$ROOT/e2e/scripts/install-deps.sh"
say "building the Kubernetes binaries (cached after the first run) and the controller"
BIN="$("$ROOT/e2e/tools/build.sh")"
export PATH="$BIN:$PATH"
cargo build --quiet --release -p silo-controller -p silo-router --manifest-path "$ROOT/Cargo.toml"

WORK="$(mktemp -d /tmp/silo-demo.XXXXXX)"
chmod 755 "$WORK"
CONTROLLER_PID=""
ROUTER_PID=""
cleanup() {
  say "stopping everything"
  [[ -n "$ROUTER_PID" ]] && kill "$ROUTER_PID" 2>/dev/null && wait "$ROUTER_PID" 2>/dev/null || true
  [[ -n "$CONTROLLER_PID" ]] && kill "$CONTROLLER_PID" 2>/dev/null && wait "$CONTROLLER_PID" 2>/dev/null || true
  "$ROOT/e2e/scripts/postgres.sh" stop "$WORK/pg-shared"
  "$ROOT/e2e/scripts/postgres.sh" stop "$WORK/pg-dedicated"
  "$ROOT/e2e/scripts/cluster.sh" down "$WORK/cluster" || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "starting a control plane (etcd, kube-apiserver, kube-controller-manager) on loopback"
"$ROOT/e2e/scripts/cluster.sh" up "$WORK/cluster"
export KUBECONFIG="$WORK/cluster/kubeconfig"
kubectl apply -f "$ROOT/charts/silo/files/crds/"
kubectl wait --for condition=established --timeout=60s crd/tenants.silo.dev crd/databaseservers.silo.dev >/dev/null

say "starting two PostgreSQL servers"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
password() { python3 -c 'import secrets; print(secrets.token_urlsafe(18))'; }
SHARED_PORT="$(free_port)"; DEDICATED_PORT="$(free_port)"
SHARED_PW="$(password)"; DEDICATED_PW="$(password)"
"$ROOT/e2e/scripts/postgres.sh" start "$WORK/pg-shared" "$SHARED_PORT" "$SHARED_PW"
"$ROOT/e2e/scripts/postgres.sh" start "$WORK/pg-dedicated" "$DEDICATED_PORT" "$DEDICATED_PW"
kubectl create secret generic pg-shared-admin --from-literal=username=silo_admin --from-literal=password="$SHARED_PW"
kubectl create secret generic pg-dedicated-admin --from-literal=username=silo_admin --from-literal=password="$DEDICATED_PW"
SHARED_PORT="$SHARED_PORT" DEDICATED_PORT="$DEDICATED_PORT" python3 -c \
  'import os,sys; sys.stdout.write(os.path.expandvars(open(sys.argv[1]).read()))' \
  "$ROOT/examples/databaseservers.yaml" | kubectl apply -f -

say "starting the router and the controller (local processes; the Helm chart comes with its own issue)"
ROUTER_PORT="$(free_port)"
"$CARGO_TARGET_DIR/release/silo-router" --listen "127.0.0.1:$ROUTER_PORT" --http-addr "127.0.0.1:$(free_port)" \
  >"$WORK/router.log" 2>&1 &
ROUTER_PID=$!
SILO_HTTP_ADDR="127.0.0.1:$(free_port)" SILO_LEASE_NAMESPACE=default SILO_ROUTER_ADDRESS="127.0.0.1:$ROUTER_PORT" \
  "$CARGO_TARGET_DIR/release/silo-controller" >"$WORK/controller.log" 2>&1 &
CONTROLLER_PID=$!

say "kubectl apply -f examples/tenants.yaml"
kubectl apply -f "$ROOT/examples/tenants.yaml"
kubectl wait --for=condition=Ready --timeout=120s tenant/acme tenant/globex tenant/initech >/dev/null
kubectl wait --for=jsonpath='{.status.tenants}'=2 --timeout=30s databaseserver/pg-shared >/dev/null

say "kubectl get tenants,databaseservers"
kubectl get tenants,databaseservers

say "a query with acme's credentials (Secret acme-db, key uri)"
URI="$(kubectl get secret acme-db -o jsonpath='{.data.uri}' | base64 -d)"
psql "$URI" -v ON_ERROR_STOP=1 -c "CREATE TABLE IF NOT EXISTS hello (msg text)" \
  -c "INSERT INTO hello VALUES ('hello from tenant acme')" \
  -c "SELECT current_database(), current_user, msg FROM hello"

say "and acme's credentials cannot open globex's database"
GLOBEX_DB="$(kubectl get secret globex-db -o jsonpath='{.data.dbname}' | base64 -d)"
if psql "${URI%/*}/$GLOBEX_DB" -c "SELECT 1" 2>&1; then echo "isolation broken" >&2; exit 1; fi

say "the same through the router: one address for every tenant (Secret acme-db, key router-uri)"
ROUTER_URI="$(kubectl get secret acme-db -o jsonpath='{.data.router-uri}' | base64 -d)"
psql "$ROUTER_URI" -v ON_ERROR_STOP=1 -c "SELECT current_database(), msg FROM hello"
INITECH_URI="$(kubectl get secret initech-db -o jsonpath='{.data.router-uri}' | base64 -d)"
psql "$INITECH_URI" -v ON_ERROR_STOP=1 -c "SELECT current_database() AS initech_via_router"

if [[ "${SILO_DEMO_EXIT:-0}" == 1 ]]; then exit 0; fi
say "the demo is running; KUBECONFIG=$KUBECONFIG (try: kubectl get tn -w). Ctrl-C stops it."
while kill -0 "$CONTROLLER_PID" 2>/dev/null; do sleep 1; done
echo "the controller exited; its log:" >&2
tail -20 "$WORK/controller.log" >&2
exit 1
