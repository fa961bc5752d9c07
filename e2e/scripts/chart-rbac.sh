#!/usr/bin/env bash
# Gives the e2e tests the chart's own identities: renders charts/silo as release `silo-e2e` in
# namespace NS, applies only its ServiceAccounts and RBAC, and writes OUT/controller.kubeconfig and
# OUT/router.kubeconfig that authenticate as the controller's and the router's ServiceAccounts, and
# OUT/env, which exports them (and the Lease the chart's RBAC allows) for the e2e harness.
# The local controller and router then run with exactly the permissions the chart grants.
# The chart is rendered for all namespaces (no controller.watchNamespace, no router.namespaces):
# each test's controller watches its own namespace (SILO_WATCH_NAMESPACE) and reads its servers'
# admin Secrets there, and the routers read every test's Tenants, which that mode's cluster-wide
# rules allow (Secrets: get, list, watch, create, patch for the controller; list, watch for the
# router). Cluster-scoped names carry the namespace (`silo-e2e-silo-e2e-controller`); the
# ServiceAccounts and the Lease are found from the Deployments and the Role, whatever their names.
#   chart-rbac.sh NS OUT      (KUBECONFIG: cluster admin; SILO_KUBECTL, SILO_HELM: the tools)
set -euo pipefail

NS="${1:?usage: chart-rbac.sh NS OUT}"
OUT="${2:?usage: chart-rbac.sh NS OUT}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
kubectl=("${SILO_KUBECTL:-kubectl}")
helm="${SILO_HELM:-helm}"

umask 077  # the kubeconfigs hold ServiceAccount tokens
mkdir -p "$OUT"
"${kubectl[@]}" create namespace "$NS" --dry-run=client -o yaml | "${kubectl[@]}" apply -f - >/dev/null
version="$("${kubectl[@]}" version -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')"
"$helm" template silo-e2e "$ROOT/charts/silo" --namespace "$NS" --kube-version "$version" --set crds.create=false \
  | "${kubectl[@]}" create --dry-run=client -o json -f - >"$OUT/chart.json"

# The RBAC objects, the ServiceAccount each Deployment runs as, and the Lease the Role names.
python3 - "$OUT" <<'PY'
import json, re, sys
out = sys.argv[1]
text, items, pos = open(f"{out}/chart.json").read(), [], 0
decoder = json.JSONDecoder()
while (start := re.compile(r"\S").search(text, pos)):  # one JSON document per object
    obj, pos = decoder.raw_decode(text, start.start())
    items.extend(obj["items"] if obj["kind"] == "List" else [obj])
rbac = [o for o in items if o["kind"] in
        ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")]
json.dump({"apiVersion": "v1", "kind": "List", "items": rbac}, open(f"{out}/rbac.json", "w"))
with open(f"{out}/identities", "w") as f:
    for o in items:
        if o["kind"] == "Deployment":
            component = o["metadata"]["labels"]["app.kubernetes.io/component"]
            f.write(f'{component} {o["spec"]["template"]["spec"]["serviceAccountName"]}\n')
leases = [name for o in rbac if o["kind"] == "Role" for rule in o.get("rules", [])
          if "leases" in rule.get("resources", []) for name in rule.get("resourceNames", [])]
open(f"{out}/lease", "w").write(leases[0] if leases else "")
PY
"${kubectl[@]}" apply -f "$OUT/rbac.json" >/dev/null

server="$("${kubectl[@]}" config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
ca="$("${kubectl[@]}" config view --minify -o jsonpath='{.clusters[0].cluster.certificate-authority}')"
while read -r component sa; do
  token="$("${kubectl[@]}" create token "$sa" --namespace "$NS" --duration 24h)"
  cat >"$OUT/$component.kubeconfig" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: silo-e2e
  cluster: {server: "$server", certificate-authority: "$ca"}
users:
- name: $sa
  user: {token: "$token"}
contexts:
- name: silo-e2e
  context: {cluster: silo-e2e, user: $sa, namespace: $NS}
current-context: silo-e2e
KCFG
done <"$OUT/identities"
for component in controller router; do
  [[ -f "$OUT/$component.kubeconfig" ]] || { echo "chart-rbac.sh: the chart renders no $component Deployment" >&2; exit 1; }
done
lease="$(cat "$OUT/lease")"
[[ -n "$lease" ]] || { echo "chart-rbac.sh: the chart's Role names no Lease" >&2; exit 1; }
cat >"$OUT/env" <<ENV
export SILO_CONTROLLER_KUBECONFIG="$OUT/controller.kubeconfig"
export SILO_ROUTER_KUBECONFIG="$OUT/router.kubeconfig"
export SILO_E2E_LEASE_NAMESPACE="$NS" SILO_E2E_LEASE_NAME="$lease"
ENV
