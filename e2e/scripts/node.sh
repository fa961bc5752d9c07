#!/usr/bin/env bash
# A real Kubernetes node for the e2e cluster: containerd + kubelet + kube-proxy in a network
# namespace of their own, so that Jobs and the chart's pods really run. See e2e/README.md.
#   node.sh net-up DIR        the namespace, its veth link and the egress guard (before the API server)
#   node.sh up DIR            containerd, kubelet and kube-proxy against the control plane in DIR
#   node.sh import DIR TAR    imports an OCI image tarball into the node's containerd (k8s.io)
#   node.sh down DIR          stops the node and removes its state, inside DIR and outside it
#   node.sh net-down DIR      removes the link, the namespace and then the guard (after the API
#                             server has stopped: until then it listens on the link's address)
# One node per machine: the first net-up records its DIR in $OWNER; another waits while that run
# goes on, and only the owner's down touches what lives outside DIR.
# Needs root. Addresses come from 198.18.0.0/15 (RFC 2544, reserved for network tests): the node
# link, the pod range and the service range all live there, and the guard rejects any packet to
# that range that would leave through an interface other than loopback or the node link.
set -euo pipefail

cmd="${1:?usage: node.sh net-up|up|import|down|net-down DIR}"
DIR="${2:?usage: node.sh net-up|up|import|down|net-down DIR}"
DIR="$(realpath -m "$DIR")"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

NETNS=silo-e2e-node
HOST_IF=silo-e2e-h
NODE_IF=silo-e2e-n
export SILO_NODE_HOST_IP=198.18.0.1 SILO_NODE_IP=198.18.0.2
LINK_PREFIX=30
POD_CIDR=198.18.16.0/24
export SILO_SERVICE_CIDR=198.19.0.0/16
GUARD_RANGE=198.18.0.0/15
GUARD_CHAIN=SILO-E2E-GUARD
GUARD_IN_CHAIN=SILO-E2E-GUARD-IN
OWNER=/run/silo-e2e-node.owner
NODE_NAME=silo-e2e-node
CGROUP_ROOT=silo-e2e
KUBELET_SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

in_node() { nsenter --net="/run/netns/$NETNS" -- "$@"; }

# shellcheck source=lib.sh
source "$HERE/lib.sh"

guard_down() {
  for chain in OUTPUT FORWARD; do
    while iptables -D "$chain" -j "$GUARD_CHAIN" 2>/dev/null; do :; done
  done
  while iptables -D INPUT -j "$GUARD_IN_CHAIN" 2>/dev/null; do :; done
  for chain in "$GUARD_CHAIN" "$GUARD_IN_CHAIN"; do
    iptables -F "$chain" 2>/dev/null || true
    iptables -X "$chain" 2>/dev/null || true
  done
}

# The link and the namespace first, the guard last: nothing may route into the range unguarded.
net_down() {
  ip link del "$HOST_IF" 2>/dev/null || true
  if [[ -e "/run/netns/$NETNS" ]]; then ip netns del "$NETNS" 2>/dev/null || true; fi
  guard_down
}

is_owner() { [[ ! -f "$OWNER" || "$(cat "$OWNER")" == "$DIR" ]]; }

# Whether the run that owns the node in $1 is still going: its folder is there and some process
# works in it (a run killed without its cleanup leaves the folder but no process).
owner_alive() { [[ -d "$1" ]] && pgrep -f -- "$1/" >/dev/null; }

# Another run's node is waited for (up to SILO_E2E_NODE_WAIT seconds, an hour by default), so two
# runs on one machine take turns instead of the second failing. The wait holds $OWNER.lock: the
# runs that wait start one at a time.
wait_for_node() {
  local other="$1" limit="${SILO_E2E_NODE_WAIT:-3600}" waited=0
  while owner_alive "$other"; do
    if ((waited == 0)); then echo "node.sh: the e2e node belongs to the run in $other; waiting for it to end" >&2; fi
    if ((waited >= limit)); then
      echo "node.sh: the e2e node still belongs to the run in $other after ${limit}s; stop it first (cluster.sh down $other)" >&2
      exit 1
    fi
    sleep 5
    waited=$((waited + 5))
  done
}

net_up() {
  exec 9>"$OWNER.lock"
  flock 9
  if [[ -f "$OWNER" ]]; then
    local other
    other="$(cat "$OWNER")"
    if [[ "$other" != "$DIR" ]]; then wait_for_node "$other"; fi
    # A crashed run's leftovers: its processes (found by its folder), mounts and shared state.
    if [[ -n "$other" && "$other" == /*/* ]]; then
      pkill -KILL -f -- "$other/" 2>/dev/null || true
      { findmnt -rn -o TARGET | grep -F "$other/" || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    fi
    echo "$DIR" >"$OWNER"
    down_machine
  fi
  echo "$DIR" >"$OWNER"
  net_down
  # Nothing on this machine may already route into the range.
  if [[ -n "$(ip -4 route show to match "$SILO_NODE_HOST_IP" | grep -v '^default')" ]]; then
    echo "node.sh: $GUARD_RANGE is already routed on this machine; refusing to start" >&2
    ip -4 route show to match "$SILO_NODE_HOST_IP" >&2
    exit 1
  fi
  ip netns add "$NETNS"
  ip link add "$HOST_IF" type veth peer name "$NODE_IF" netns "$NETNS"
  ip addr add "$SILO_NODE_HOST_IP/$LINK_PREFIX" dev "$HOST_IF"
  ip link set "$HOST_IF" up
  in_node ip link set lo up
  in_node ip addr add "$SILO_NODE_IP/$LINK_PREFIX" dev "$NODE_IF"
  in_node ip link set "$NODE_IF" up
  # The node namespace gets no default route: the only peer it can reach is this machine.
  # This machine reaches pods through the node (tests talk to router replicas one by one); the
  # route goes with the link.
  ip route add "$POD_CIDR" via "$SILO_NODE_IP" dev "$HOST_IF"

  # The guard: packets to the test range may leave only through loopback or the node link; on any
  # other interface (the machine's way out) they are rejected, so a mistake fails loudly. And the
  # range answers nobody but this machine and its node.
  guard_chain "$GUARD_CHAIN" -o OUTPUT FORWARD
  guard_chain "$GUARD_IN_CHAIN" -i INPUT
}

# guard_chain CHAIN -o|-i HOOK...: a chain that lets the range through loopback and the node link
# (as output or input interface) and rejects it elsewhere, jumped to from each HOOK.
guard_chain() {
  local chain="$1" dir="$2" hook
  shift 2
  iptables -N "$chain"
  iptables -A "$chain" "$dir" lo -j RETURN
  iptables -A "$chain" "$dir" "$HOST_IF" -j RETURN
  iptables -A "$chain" -d "$GUARD_RANGE" -p tcp -j REJECT --reject-with tcp-reset
  iptables -A "$chain" -d "$GUARD_RANGE" -j REJECT --reject-with icmp-net-unreachable
  for hook in "$@"; do iptables -I "$hook" -j "$chain"; done
}

# A client certificate signed by the cluster CA, and a kubeconfig using it.
client_kubeconfig() {
  local name="$1" subject="$2" server="$3" pki="$DIR/pki"
  openssl req -newkey rsa:2048 -nodes -subj "$subject" \
    -keyout "$pki/$name.key" -out "$pki/$name.csr" 2>/dev/null
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 2 -extfile "$pki/client.ext" -out "$pki/$name.crt" 2>/dev/null
  cat >"$DIR/node/$name.kubeconfig" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: silo-e2e
  cluster: {server: "$server", certificate-authority: "$pki/ca.crt"}
users:
- name: $name
  user: {client-certificate: "$pki/$name.crt", client-key: "$pki/$name.key"}
contexts:
- name: silo-e2e
  context: {cluster: silo-e2e, user: $name}
current-context: silo-e2e
KCFG
}

cgroup_dirs() {
  local c
  for c in /sys/fs/cgroup/*/; do
    [[ -d "$c$CGROUP_ROOT" ]] && echo "$c$CGROUP_ROOT"
  done
  return 0
}

up() {
  local bin node="$DIR/node" server
  bin="$("$HERE/../tools/build.sh")"
  server="$(sed -n 's/^ *server: *//p' "$DIR/kubeconfig" | head -1)"
  mkdir -p "$node"/{containerd,cni,cni-ipam,kubelet,pod-logs,images} "$DIR/logs"
  [[ -e "/run/netns/$NETNS" ]] || { echo "node.sh: run 'node.sh net-up' first" >&2; exit 1; }

  # containerd: all state under DIR; the CRI settings these machines need (NODE.md).
  cat >"$node/containerd.toml" <<TOML
version = 2
root = "$node/containerd/root"
state = "$node/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$node/containerd.sock"
[ttrpc]
  address = "$node/containerd.sock.ttrpc"
[debug]
  address = "$node/containerd-debug.sock"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:v1"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$node/cni"
TOML
  # One bridge inside the node namespace; pods' traffic is masqueraded to the node address.
  cat >"$node/cni/10-silo.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "silo-e2e",
  "plugins": [
    {
      "type": "bridge", "bridge": "silo-br0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
      "ipam": {
        "type": "host-local", "dataDir": "$node/cni-ipam",
        "ranges": [[{"subnet": "$POD_CIDR"}]], "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
  nsenter --net="/run/netns/$NETNS" -- containerd --config "$node/containerd.toml" >"$DIR/logs/containerd.log" 2>&1 &
  echo $! >"$node/containerd.pid"
  for _ in $(seq 100); do [[ -S "$node/containerd.sock" ]] && break; sleep 0.1; done
  [[ -S "$node/containerd.sock" ]] || { echo "node.sh: containerd did not start" >&2; tail "$DIR/logs/containerd.log" >&2; exit 1; }

  local pause="${SILO_CACHE:-$HOME/.cache/silo}/images/pause-$(sha256sum "$HERE/../images/pause.c" | cut -c1-12).tar"
  if [[ ! -f "$pause" ]]; then
    mkdir -p "$(dirname "$pause")"
    "$HERE/images.sh" pause "$pause"
  fi
  import_image "$pause" pause

  # kubelet: cgroupfs driver (no systemd, cgroup v1), no OOM score changes, all state under DIR.
  local c
  for c in /sys/fs/cgroup/*/; do
    [[ "$c" == */unified/ ]] && continue
    mkdir -p "$c$CGROUP_ROOT"
  done
  cat /sys/fs/cgroup/cpuset/cpuset.cpus >"/sys/fs/cgroup/cpuset/$CGROUP_ROOT/cpuset.cpus"
  cat /sys/fs/cgroup/cpuset/cpuset.mems >"/sys/fs/cgroup/cpuset/$CGROUP_ROOT/cpuset.mems"
  client_kubeconfig kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" "$server"
  client_kubeconfig kube-proxy "/CN=system:kube-proxy" "$server"
  : >"$node/resolv.conf"
  # kubelet sets these kernel settings on the host (vm.overcommit_memory, kernel.panic, ...); they
  # are put back on down.
  sysctl -e "${KUBELET_SYSCTLS[@]}" >"$DIR/sysctl.saved"
  cat >"$node/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP_ROOT
failCgroupV1: false
containerRuntimeEndpoint: unix://$node/containerd.sock
address: $SILO_NODE_IP
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$DIR/pki/ca.crt"}
authorization: {mode: Webhook}
oomScoreAdj: 0
failSwapOn: false
resolvConf: "$node/resolv.conf"
podLogsDir: "$node/pod-logs"
volumePluginDir: "$node/volume-plugins"
rotateCertificates: false
serializeImagePulls: false
imageGCHighThresholdPercent: 100
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
localStorageCapacityIsolation: false
maxPods: 50
YAML
  nsenter --net="/run/netns/$NETNS" -- "$bin/kubelet" --config "$node/kubelet.yaml" --kubeconfig "$node/kubelet.kubeconfig" \
    --root-dir "$node/kubelet" --cert-dir "$node/kubelet/pki" --hostname-override "$NODE_NAME" \
    --node-ip "$SILO_NODE_IP" --v 1 >"$DIR/logs/kubelet.log" 2>&1 &
  echo $! >"$node/kubelet.pid"

  # kube-proxy gives ClusterIPs (the `kubernetes` Service among them) inside the node namespace.
  cat >"$node/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
bindAddress: $SILO_NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
clientConnection: {kubeconfig: "$node/kube-proxy.kubeconfig"}
conntrack: {maxPerCore: 0}
YAML
  nsenter --net="/run/netns/$NETNS" -- "$bin/kube-proxy" --config "$node/kube-proxy.yaml" >"$DIR/logs/kube-proxy.log" 2>&1 &
  echo $! >"$node/kube-proxy.pid"

  local kubectl=("$bin/kubectl" --kubeconfig "$DIR/kubeconfig")
  for _ in $(seq 600); do
    if [[ "$("${kubectl[@]}" get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]; then
      echo "node.sh: node $NODE_NAME Ready at $SILO_NODE_IP (pods $POD_CIDR, services $SILO_SERVICE_CIDR)" >&2
      return 0
    fi
    kill -0 "$(cat "$node/kubelet.pid")" 2>/dev/null || break
    sleep 0.2
  done
  echo "node.sh: node did not become Ready; last kubelet log lines:" >&2
  tail -30 "$DIR/logs/kubelet.log" >&2
  exit 1
}

# Imports an OCI layout tarball as localhost/NAME:<its tag>; pods use imagePullPolicy Never.
import_image() {
  local tar="$1" name="$2"
  ctr --address "$DIR/node/containerd.sock" -n k8s.io images import --base-name "localhost/$name" \
    "$tar" >/dev/null
}

# The node's processes and mounts, found by DIR.
down_local() {
  local node="$DIR/node"
  # kubelet first (it would restart containers), then every process in the node's cgroups (the
  # containers), then the rest of the node.
  stop_pid "$node/kubelet.pid"
  if is_owner; then kill_cgroup_processes; fi
  for p in kube-proxy containerd; do stop_pid "$node/$p.pid"; done
  # Whatever is left that runs from the node's folder: shims, or a process whose PID file was lost.
  pkill -KILL -f -- "$node/" 2>/dev/null || true
  # Mounts the node left under DIR: pod volumes, container root filesystems.
  { findmnt -rn -o TARGET | grep -F "$DIR/" || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
}

kill_cgroup_processes() {
  local f pid
  for f in $(cgroup_dirs | sed -n '/\/pids\//p'); do
    for pid in $(find "$f" -name cgroup.procs -exec cat {} + 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
  done
}

# What the node leaves outside DIR, in places every node shares: only the owner cleans it.
down_machine() {
  local f
  kill_cgroup_processes
  for f in /run/netns/cni-*; do
    [[ -e "$f" ]] || continue
    umount -l "$f" 2>/dev/null || true
    rm -f "$f"
  done
  rm -rf /run/containerd/s /run/containerd/fifo /run/containerd/runc/k8s.io
  rmdir /run/containerd/runc /run/containerd 2>/dev/null || true
  # libcni's result cache, and what kubelet keeps at fixed paths whatever its root directory.
  rm -f /var/lib/cni/results/silo-e2e-* /var/lib/cni/results/cni-loopback-*
  rmdir /var/lib/cni/results /var/lib/cni 2>/dev/null || true
  rm -f /var/lib/kubelet/device-plugins/kubelet.sock
  rmdir /var/lib/kubelet/device-plugins /var/lib/kubelet 2>/dev/null || true
  find /var/log/containers -maxdepth 1 -type l -lname "$DIR/*" -delete 2>/dev/null || true
  rmdir /var/log/containers 2>/dev/null || true
  # Cgroups, deepest first (a cgroup folder is removed with rmdir once it has no processes).
  # Killed processes take a moment to leave their cgroups.
  for _ in $(seq 100); do
    for f in $(cgroup_dirs); do
      find "$f" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
    [[ -z "$(cgroup_dirs)" ]] && break
    sleep 0.1
  done
  if [[ -f "$DIR/sysctl.saved" ]]; then
    sysctl -q -p "$DIR/sysctl.saved" || true
    rm -f "$DIR/sysctl.saved"
  fi
}

down() {
  local node="$DIR/node"
  down_local
  if is_owner; then down_machine; fi
  rm -rf --one-file-system "$node" 2>/dev/null || true

  # Torn down completely, or say what is left.
  local left=()
  pgrep -f -- "$node/" >/dev/null && left+=("processes: $(pgrep -f -- "$node/" | tr '\n' ' ')")
  findmnt -rn -o TARGET | grep -qF "$DIR/" && left+=("mounts under $DIR")
  if is_owner; then
    [[ -n "$(cgroup_dirs)" ]] && left+=("cgroups: $(cgroup_dirs | tr '\n' ' ')")
    compgen -G '/var/lib/cni/results/silo-e2e-*' >/dev/null && left+=("/var/lib/cni/results/silo-e2e-*")
  fi
  [[ -d "$node" ]] && left+=("folder $node")
  report_left "${left[@]}"
}

net_down_checked() {
  is_owner || return 0
  net_down
  local left=()
  [[ -e "/run/netns/$NETNS" ]] && left+=("network namespace $NETNS")
  ip link show "$HOST_IF" >/dev/null 2>&1 && left+=("link $HOST_IF")
  iptables -n -L "$GUARD_CHAIN" >/dev/null 2>&1 && left+=("iptables chain $GUARD_CHAIN")
  iptables -n -L "$GUARD_IN_CHAIN" >/dev/null 2>&1 && left+=("iptables chain $GUARD_IN_CHAIN")
  report_left "${left[@]}"
  rm -f "$OWNER"
}

report_left() {
  if (($#)); then
    printf 'node.sh: left behind: %s\n' "$@" >&2
    exit 1
  fi
}

case "$cmd" in
  net-up) net_up ;;
  up) up ;;
  import) import_image "${3:?usage: node.sh import DIR TAR NAME}" "${4:?usage: node.sh import DIR TAR NAME}" ;;
  down) down ;;
  net-down) net_down_checked ;;
  *) echo "usage: node.sh net-up|up|import|down|net-down DIR" >&2; exit 2 ;;
esac
