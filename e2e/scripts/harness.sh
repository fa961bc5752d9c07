# Sourced by run-tests.sh and the benchmarks: the cluster the e2e harness (silo-e2e) runs against.
#   harness_up WORK    a cluster in WORK/cluster (or $KUBECONFIG with SILO_E2E_USE_KUBECONFIG=1),
#                      the CRDs, and the chart's identities for the local controller and router;
#                      exports KUBECONFIG, SILO_KUBECTL, SILO_HELM and what silo-e2e's Env reads
#   harness_down WORK  stops the cluster
# Expects ROOT (the repository) and the pinned tools built (e2e/tools/build.sh).

harness_up() {
  local work="$1" bin
  bin="$("$ROOT/e2e/tools/build.sh")"
  export SILO_KUBECTL="$bin/kubectl" SILO_HELM="$bin/helm"
  if [[ "${SILO_E2E_USE_KUBECONFIG:-0}" != 1 ]]; then
    "$ROOT/e2e/scripts/cluster.sh" up "$work/cluster"
    # shellcheck disable=SC1091
    source "$work/cluster/env"
    # Tests that change cluster-wide objects (the chart adopting the CRDs) run only here.
    export SILO_E2E_OWN_CLUSTER=1
  fi
  "$SILO_KUBECTL" apply -f "$ROOT/charts/silo/files/crds/" >/dev/null
  # Retried: a CRD read before the API server wrote its first status has no conditions, and
  # `kubectl wait` then fails at once ("accessor error: <nil>") instead of waiting.
  local crds=() f
  for f in "$ROOT"/charts/silo/files/crds/*.yaml; do crds+=("crd/$(basename "$f" .yaml)"); done
  for _ in $(seq 30); do
    "$SILO_KUBECTL" wait --for condition=established --timeout=10s "${crds[@]}" >/dev/null 2>&1 && break
    sleep 1
  done
  "$SILO_KUBECTL" wait --for condition=established --timeout=10s "${crds[@]}" >/dev/null
  # The local controller and router run as the chart's ServiceAccounts, with the chart's RBAC.
  "$ROOT/e2e/scripts/chart-rbac.sh" silo-e2e "$work/identities"
  # shellcheck disable=SC1091
  source "$work/identities/env"
}

harness_down() {
  if [[ "${SILO_E2E_USE_KUBECONFIG:-0}" == 1 && -f "$1/identities/rbac.json" ]]; then
    "$SILO_KUBECTL" delete --ignore-not-found -f "$1/identities/rbac.json" >/dev/null || true
  fi
  "$ROOT/e2e/scripts/cluster.sh" down "$1/cluster"
}
