#!/usr/bin/env bash
# A local Kubernetes cluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and,
# with SILO_E2E_NODE=1 (the default as root), a real node (e2e/scripts/node.sh).
#   cluster.sh up DIR     start it; writes DIR/kubeconfig and DIR/env (KUBECONFIG=...)
#   cluster.sh down DIR   stop every process it started and remove DIR and all node state
# Without a node the API server listens on loopback and several control planes can run side by
# side; with one it listens on the node link's host address (one node per machine at a time).
set -euo pipefail

cmd="${1:?usage: cluster.sh up|down DIR}"
DIR="${2:?usage: cluster.sh up|down DIR}"
DIR="$(realpath -m "$DIR")"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

NODE="${SILO_E2E_NODE:-$([[ "$(id -u)" == 0 ]] && echo 1 || echo 0)}"
SERVICE_CIDR=10.96.0.0/16
API_ADDR=127.0.0.1
if [[ "$NODE" == 1 ]]; then
  # The node's addresses (node.sh): pods reach the API server and PostgreSQL on the host side of
  # the node link, and the `kubernetes` Service's ClusterIP through kube-proxy.
  SERVICE_CIDR=198.19.0.0/16
  API_ADDR=198.18.0.1
fi

free_port() {
  python3 -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "${1:-127.0.0.1}"
}

# shellcheck source=lib.sh
source "$HERE/lib.sh"

down() {
  [[ -d "$DIR" ]] || return 0
  local rc=0 node=""
  [[ -f "$DIR/node.enabled" ]] && node=1
  if [[ -n "$node" ]]; then "$HERE/node.sh" down "$DIR" || rc=$?; fi
  for c in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_pid "$DIR/$c.pid"; done
  # Only now that nothing listens on or dials the link's address may the link and guard go.
  if [[ -n "$node" ]]; then "$HERE/node.sh" net-down "$DIR" || rc=$?; fi
  rm -rf --one-file-system "$DIR"
  return "$rc"
}

up() {
  local bin
  bin="$("$HERE/../tools/build.sh")"
  mkdir -p "$DIR/pki" "$DIR/logs"
  local pki="$DIR/pki"
  if [[ "$NODE" == 1 ]]; then
    touch "$DIR/node.enabled"
    "$HERE/node.sh" net-up "$DIR"
  fi

  # Certificates: a CA, the API server's serving certificate, an admin client certificate
  # (system:masters) and the service-account signing key.
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=silo-e2e-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
  # rustls (the controller's TLS) accepts only X.509 v3 certificates, hence the extension files.
  printf 'subjectAltName=IP:127.0.0.1,IP:198.18.0.1,IP:198.19.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' >"$pki/server.ext"
  printf 'extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n' >"$pki/client.ext"
  openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 2 -extfile "$pki/server.ext" -out "$pki/apiserver.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=silo-e2e-admin" \
    -keyout "$pki/admin.key" -out "$pki/admin.csr" 2>/dev/null
  openssl x509 -req -in "$pki/admin.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 2 -extfile "$pki/client.ext" -out "$pki/admin.crt" 2>/dev/null
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null

  local etcd_port etcd_peer api_port kcm_port sched_port
  etcd_port="$(free_port)"; etcd_peer="$(free_port)"; api_port="$(free_port "$API_ADDR")"
  kcm_port="$(free_port)"; sched_port="$(free_port)"

  "$bin/etcd" --name default --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "default=http://127.0.0.1:$etcd_peer" --listen-metrics-urls "" \
    --unsafe-no-fsync --log-level warn >"$DIR/logs/etcd.log" 2>&1 &
  echo $! >"$DIR/etcd.pid"

  "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address "$API_ADDR" --advertise-address "$API_ADDR" --secure-port "$api_port" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" --authorization-mode Node,RBAC \
    --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$pki/sa.pub" \
    --service-account-signing-key-file "$pki/sa.key" --service-cluster-ip-range "$SERVICE_CIDR" \
    --kubelet-client-certificate "$pki/admin.crt" --kubelet-client-key "$pki/admin.key" \
    --kubelet-preferred-address-types InternalIP \
    --allow-privileged=true --profiling=false --cert-dir "$DIR/apiserver-certs" \
    >"$DIR/logs/kube-apiserver.log" 2>&1 &
  echo $! >"$DIR/kube-apiserver.pid"

  cat >"$DIR/kubeconfig" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: silo-e2e
  cluster:
    server: https://$API_ADDR:$api_port
    certificate-authority: $pki/ca.crt
users:
- name: admin
  user:
    client-certificate: $pki/admin.crt
    client-key: $pki/admin.key
contexts:
- name: silo-e2e
  context: {cluster: silo-e2e, user: admin, namespace: default}
current-context: silo-e2e
KCFG

  local ok=""
  for _ in $(seq 300); do
    if "$bin/kubectl" --kubeconfig "$DIR/kubeconfig" get --raw /readyz >/dev/null 2>&1; then ok=1; break; fi
    kill -0 "$(cat "$DIR/kube-apiserver.pid")" 2>/dev/null || break
    sleep 0.2
  done
  if [[ -z "$ok" ]]; then
    echo "cluster.sh: kube-apiserver did not become ready; last log lines:" >&2
    tail -20 "$DIR/logs/kube-apiserver.log" >&2
    down
    exit 1
  fi

  "$bin/kube-controller-manager" --kubeconfig "$DIR/kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" --cert-dir "$DIR/kcm-certs" \
    --leader-elect=false --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
    --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
    --service-cluster-ip-range "$SERVICE_CIDR" --profiling=false \
    >"$DIR/logs/kube-controller-manager.log" 2>&1 &
  echo $! >"$DIR/kube-controller-manager.pid"
  "$bin/kube-scheduler" --kubeconfig "$DIR/kubeconfig" --authentication-kubeconfig "$DIR/kubeconfig" \
    --authorization-kubeconfig "$DIR/kubeconfig" --bind-address 127.0.0.1 --secure-port "$sched_port" \
    --leader-elect=false --profiling=false >"$DIR/logs/kube-scheduler.log" 2>&1 &
  echo $! >"$DIR/kube-scheduler.pid"
  if [[ "$NODE" == 1 ]]; then "$HERE/node.sh" up "$DIR"; fi

  {
    echo "export KUBECONFIG=$DIR/kubeconfig"
    echo "export PATH=$bin:\$PATH"
    if [[ "$NODE" == 1 ]]; then echo "export SILO_E2E_NODE_HOST=$API_ADDR"; fi
  } >"$DIR/env"
  echo "cluster.sh: cluster up at https://$API_ADDR:$api_port ($("$bin/kubectl" --kubeconfig "$DIR/kubeconfig" version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])'))" >&2
}

case "$cmd" in
  up) up ;;
  down) down ;;
  *) echo "usage: cluster.sh up|down DIR" >&2; exit 2 ;;
esac
