#!/usr/bin/env bash
# Builds the pinned upstream binaries the e2e harness runs from the Go module proxy into
# ~/.cache/silo/k8s/<version>/bin: the control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler, etcd), the node (kubelet, kube-proxy), kubectl and helm. Only missing binaries are
# built; a second run builds nothing. Prints the bin directory on stdout.
set -euo pipefail

KUBE_VERSION="${SILO_KUBE_VERSION:-v1.34.4}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${SILO_CACHE:-$HOME/.cache/silo}"
OUT="$CACHE/k8s/$KUBE_VERSION"
BIN="$OUT/bin"
HELM_VERSION="${SILO_HELM_VERSION:-v3.22.0}"
TOOLS=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)

have_all() {
  for t in "${TOOLS[@]}" etcd helm; do [[ -x "$BIN/$t" ]] || return 1; done
}
if have_all; then echo "$BIN"; exit 0; fi

command -v go >/dev/null || { echo "build.sh: go is required" >&2; exit 1; }
export GOFLAGS=-mod=mod GOTOOLCHAIN=local
SRC="$OUT/src"
mkdir -p "$SRC/etcd" "$BIN"
cp "$HERE/etcd/main.go" "$SRC/etcd/main.go"

# The wrapper module: require the release and map every staging module it replaces with ./staging
# to the published v0.X.Y version, derived from the release's own go.mod.
KUBE_MOD="$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
STAGING_VERSION="v0.${KUBE_VERSION#v1.}"
ETCD_VERSION="$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2 }' "$KUBE_MOD")"
{
  echo "module silo.dev/e2e-tools"
  echo
  echo "go 1.24.0"
  echo
  echo "require ("
  echo "	k8s.io/kubernetes $KUBE_VERSION"
  echo "	go.etcd.io/etcd/server/v3 $ETCD_VERSION"
  echo ")"
  echo
  echo "replace ("
  awk '$2 == "=>" && $3 ~ /^\.\/staging\// { print "\t" $1 " => " $1 " '"$STAGING_VERSION"'" }' "$KUBE_MOD"
  echo ")"
} >"$SRC/go.mod"
{
  echo "//go:build tools"
  echo
  echo "package tools"
  echo
  echo "import ("
  for t in "${TOOLS[@]}"; do echo "	_ \"k8s.io/kubernetes/cmd/$t\""; done
  echo ")"
} >"$SRC/tools.go"

cd "$SRC"
echo "build.sh: resolving modules for Kubernetes $KUBE_VERSION (etcd $ETCD_VERSION)" >&2
go mod tidy >&2

MAJOR="${KUBE_VERSION#v}"; MAJOR="${MAJOR%%.*}"
MINOR="${KUBE_VERSION#v*.}"; MINOR="${MINOR%%.*}"
LDFLAGS="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  LDFLAGS+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=$MAJOR -X $pkg.gitMinor=$MINOR"
  LDFLAGS+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
for t in "${TOOLS[@]}"; do
  [[ -x "$BIN/$t" ]] && continue
  echo "build.sh: building $t" >&2
  CGO_ENABLED=0 go build -trimpath -ldflags "$LDFLAGS" -o "$BIN/$t.tmp" "k8s.io/kubernetes/cmd/$t"
  mv "$BIN/$t.tmp" "$BIN/$t"
done
if [[ ! -x "$BIN/etcd" ]]; then
  echo "build.sh: building etcd" >&2
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" ./etcd
  mv "$BIN/etcd.tmp" "$BIN/etcd"
fi

# helm has no replace directives: its own module, built as published, with its version stamped.
if [[ ! -x "$BIN/helm" ]]; then
  echo "build.sh: building helm $HELM_VERSION" >&2
  mkdir -p "$OUT/helm-src"
  cd "$OUT/helm-src"
  [[ -f go.mod ]] || go mod init silo.dev/e2e-helm >&2
  go get "helm.sh/helm/v3@$HELM_VERSION" >&2
  # As helm's Makefile does: the Kubernetes version `helm template` and `helm lint` assume is the
  # one of the client-go helm is built with (otherwise 1.20, which charts' kubeVersion refuse).
  client_go="$(go list -m -f '{{.Version}}' k8s.io/client-go)"
  k8s_minor="${client_go#v0.}"; k8s_minor="${k8s_minor%%.*}"
  helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    helm_ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
  done
  CGO_ENABLED=0 go build -trimpath -ldflags "$helm_ldflags" -o "$BIN/helm.tmp" helm.sh/helm/v3/cmd/helm
  mv "$BIN/helm.tmp" "$BIN/helm"
fi
echo "$BIN"
