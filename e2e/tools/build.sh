#!/usr/bin/env bash
# Builds the pinned upstream binaries the e2e harness runs (kube-apiserver, kube-controller-manager,
# kubectl, etcd) from the Go module proxy into ~/.cache/silo/k8s/<version>/bin. A second run builds
# nothing. Prints the bin directory on stdout.
set -euo pipefail

KUBE_VERSION="${SILO_KUBE_VERSION:-v1.34.4}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${SILO_CACHE:-$HOME/.cache/silo}"
OUT="$CACHE/k8s/$KUBE_VERSION"
BIN="$OUT/bin"
TOOLS=(kube-apiserver kube-controller-manager kubectl)

have_all() {
  for t in "${TOOLS[@]}" etcd; do [[ -x "$BIN/$t" ]] || return 1; done
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
  echo "build.sh: building $t" >&2
  CGO_ENABLED=0 go build -trimpath -ldflags "$LDFLAGS" -o "$BIN/$t.tmp" "k8s.io/kubernetes/cmd/$t"
  mv "$BIN/$t.tmp" "$BIN/$t"
done
echo "build.sh: building etcd" >&2
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" ./etcd
mv "$BIN/etcd.tmp" "$BIN/etcd"
echo "$BIN"
