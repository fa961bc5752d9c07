#!/usr/bin/env bash
# A local Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager.
#   cluster.sh up DIR     start it; writes DIR/kubeconfig and DIR/env (KUBECONFIG=...)
#   cluster.sh down DIR   stop every process it started and remove DIR
# Ports are chosen free at start, so several control planes can run side by side.
set -euo pipefail

cmd="${1:?usage: cluster.sh up|down DIR}"
DIR="${2:?usage: cluster.sh up|down DIR}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop_pid() {
  local file="$1" pid
  [[ -f "$file" ]] || return 0
  pid="$(cat "$file")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

down() {
  [[ -d "$DIR" ]] || return 0
  for c in kube-controller-manager kube-apiserver etcd; do stop_pid "$DIR/$c.pid"; done
  rm -rf "$DIR"
}

up() {
  local bin
  bin="$("$HERE/../tools/build.sh")"
  mkdir -p "$DIR/pki" "$DIR/logs"
  DIR="$(cd "$DIR" && pwd)"
  local pki="$DIR/pki"

  # Certificates: a CA, the API server's serving certificate, an admin client certificate
  # (system:masters) and the service-account signing key.
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=silo-e2e-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
  # rustls (the controller's TLS) accepts only X.509 v3 certificates, hence the extension files.
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' >"$pki/server.ext"
  printf 'extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n' >"$pki/client.ext"
  openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 2 -extfile "$pki/server.ext" -out "$pki/apiserver.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=silo-e2e-admin" \
    -keyout "$pki/admin.key" -out "$pki/admin.csr" 2>/dev/null
  openssl x509 -req -in "$pki/admin.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 2 -extfile "$pki/client.ext" -out "$pki/admin.crt" 2>/dev/null
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null

  local etcd_port etcd_peer api_port kcm_port
  etcd_port="$(free_port)"; etcd_peer="$(free_port)"; api_port="$(free_port)"; kcm_port="$(free_port)"

  "$bin/etcd" --name default --data-dir "$DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "default=http://127.0.0.1:$etcd_peer" --listen-metrics-urls "" \
    --unsafe-no-fsync --log-level warn >"$DIR/logs/etcd.log" 2>&1 &
  echo $! >"$DIR/etcd.pid"

  "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" --authorization-mode Node,RBAC \
    --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$pki/sa.pub" \
    --service-account-signing-key-file "$pki/sa.key" --service-cluster-ip-range 10.96.0.0/16 \
    --allow-privileged=true --profiling=false --cert-dir "$DIR/apiserver-certs" \
    >"$DIR/logs/kube-apiserver.log" 2>&1 &
  echo $! >"$DIR/kube-apiserver.pid"

  cat >"$DIR/kubeconfig" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: silo-e2e
  cluster:
    server: https://127.0.0.1:$api_port
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
    --service-cluster-ip-range 10.96.0.0/16 --profiling=false \
    >"$DIR/logs/kube-controller-manager.log" 2>&1 &
  echo $! >"$DIR/kube-controller-manager.pid"

  {
    echo "export KUBECONFIG=$DIR/kubeconfig"
    echo "export PATH=$bin:\$PATH"
  } >"$DIR/env"
  echo "cluster.sh: control plane up at https://127.0.0.1:$api_port ($("$bin/kubectl" --kubeconfig "$DIR/kubeconfig" version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])'))" >&2
}

case "$cmd" in
  up) up ;;
  down) down ;;
  *) echo "usage: cluster.sh up|down DIR" >&2; exit 2 ;;
esac
