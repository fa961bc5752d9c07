#!/usr/bin/env bash
# The Silo demo: a local cluster with a node, Silo installed with its Helm chart, two PostgreSQL
# servers, the example tenants, and queries with a tenant's credentials Secret, directly and through
# the router. Without a node (not root, or SILO_E2E_NODE=0) the controller and router run as local
# processes instead, and the demo says so. Ctrl-C stops and removes everything.
# SILO_DEMO_EXIT=1 exits after the queries instead of waiting.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:/usr/local/go/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/silo/target}"
say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

"$ROOT/e2e/scripts/install-deps.sh"
say "building the Kubernetes binaries and helm (cached after the first run), the controller and the router"
BIN="$("$ROOT/e2e/tools/build.sh")"
export PATH="$BIN:$PATH"
cargo build --quiet --release -p silo-controller -p silo-router --manifest-path "$ROOT/Cargo.toml"

WORK="$(mktemp -d /tmp/silo-demo.XXXXXX)"
chmod 755 "$WORK"
PIDS=()
cleanup() {
  say "stopping everything"
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
  "$ROOT/e2e/scripts/postgres.sh" stop "$WORK/pg-shared"
  "$ROOT/e2e/scripts/postgres.sh" stop "$WORK/pg-dedicated"
  "$ROOT/e2e/scripts/cluster.sh" down "$WORK/cluster" || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
password() { python3 -c 'import secrets; print(secrets.token_urlsafe(18))'; }

say "starting a cluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, and a node"
"$ROOT/e2e/scripts/cluster.sh" up "$WORK/cluster"
# shellcheck disable=SC1091
source "$WORK/cluster/env"
PG_HOST="${SILO_E2E_NODE_HOST:-127.0.0.1}"

say "starting two PostgreSQL servers"
SHARED_PORT="$(free_port)"; DEDICATED_PORT="$(free_port)"
SHARED_PW="$(password)"; DEDICATED_PW="$(password)"
"$ROOT/e2e/scripts/postgres.sh" start "$WORK/pg-shared" "$SHARED_PORT" "$SHARED_PW" "${SILO_E2E_NODE_HOST:-}"
"$ROOT/e2e/scripts/postgres.sh" start "$WORK/pg-dedicated" "$DEDICATED_PORT" "$DEDICATED_PW" "${SILO_E2E_NODE_HOST:-}"

ROUTER_PORT="$(free_port)"
if [[ -n "${SILO_E2E_NODE_HOST:-}" ]]; then
  say "helm install silo charts/silo (the image built from the Dockerfile's contents, imported into the node)"
  "$ROOT/e2e/scripts/images.sh" silo "$WORK/silo-image.tar" "$CARGO_TARGET_DIR/release" demo
  "$ROOT/e2e/scripts/node.sh" import "$WORK/cluster" "$WORK/silo-image.tar" silo
  helm install silo "$ROOT/charts/silo" --namespace silo-system --create-namespace \
    --set image.repository=localhost/silo,image.tag=demo,image.pullPolicy=Never,router.replicas=1 \
    --wait --timeout 180s
  kubectl get pods -n silo-system
  # The router's Service, on this machine's loopback, for psql below. A port-forward ends with the
  # pod it picked; started again, it picks a live one, so the demo rides out a router restart.
  (trap 'kill "$forward" 2>/dev/null; exit 0' TERM
   while true; do
     kubectl port-forward -n silo-system svc/silo-router "$ROUTER_PORT:6432" >>"$WORK/port-forward.log" 2>&1 &
     forward=$!
     wait "$forward" || true  # it ends with its pod: start it again
     sleep 1
   done) &
  PIDS+=($!)
  ROUTER_IN_CLUSTER="silo-router.silo-system.svc:6432"
else
  say "no node here (it needs root): the CRDs from the chart, the controller and router as local processes"
  kubectl apply -f "$ROOT/charts/silo/files/crds/"
  kubectl wait --for condition=established --timeout=60s crd/tenants.silo.dev crd/databaseservers.silo.dev >/dev/null
  "$CARGO_TARGET_DIR/release/silo-router" --listen "127.0.0.1:$ROUTER_PORT" --http-addr "127.0.0.1:$(free_port)" \
    >"$WORK/router.log" 2>&1 &
  PIDS+=($!)
  kubectl create namespace silo-system
  SILO_HTTP_ADDR="127.0.0.1:$(free_port)" SILO_LEASE_NAMESPACE=default SILO_ROUTER_ADDRESS="127.0.0.1:$ROUTER_PORT" \
    SILO_ADMIN_SECRET_NAMESPACES=silo-system \
    "$CARGO_TARGET_DIR/release/silo-controller" >"$WORK/controller.log" 2>&1 &
  PIDS+=($!)
  ROUTER_IN_CLUSTER="127.0.0.1:$ROUTER_PORT"
fi

# The admin passwords go to kubectl on stdin, not on its command line, into Silo's own namespace:
# the only one (with controller.adminSecretNamespaces) the controller reads admin Secrets from.
printf '%s' "$SHARED_PW" | kubectl create secret generic -n silo-system pg-shared-admin --from-literal=username=silo_admin --from-file=password=/dev/stdin
printf '%s' "$DEDICATED_PW" | kubectl create secret generic -n silo-system pg-dedicated-admin --from-literal=username=silo_admin --from-file=password=/dev/stdin
PG_HOST="$PG_HOST" SHARED_PORT="$SHARED_PORT" DEDICATED_PORT="$DEDICATED_PORT" python3 -c \
  'import os,sys; sys.stdout.write(os.path.expandvars(open(sys.argv[1]).read()))' \
  "$ROOT/examples/databaseservers.yaml" | kubectl apply -f -

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
via_router() {
  # The router-uri names the router's Service; from this machine, it is the local port instead.
  kubectl get secret "$1-db" -o jsonpath='{.data.router-uri}' | base64 -d | sed "s|@$ROUTER_IN_CLUSTER/|@127.0.0.1:$ROUTER_PORT/|"
}
psql "$(via_router acme)" -v ON_ERROR_STOP=1 -c "SELECT current_database(), msg FROM hello"
psql "$(via_router initech)" -v ON_ERROR_STOP=1 -c "SELECT current_database() AS initech_via_router"

if [[ "${SILO_DEMO_EXIT:-0}" == 1 ]]; then exit 0; fi
say "the demo is running; KUBECONFIG=$KUBECONFIG (try: kubectl get tn -w). Ctrl-C stops it."
while sleep 1; do
  for pid in "${PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "a demo process exited; logs are in $WORK" >&2; exit 1; }
  done
done
