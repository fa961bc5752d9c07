#!/usr/bin/env bash
# Installs what the tests and the demo need from Debian's packages, only when something is missing.
# Go and Rust come with the machine; the Kubernetes binaries are built by e2e/tools/build.sh.
set -euo pipefail

packages=(postgresql postgresql-client openssl iproute2 procps python3-venv
  # The S3 test store (versitygw, e2e/scripts/s3.sh) and its bucket, made with curl's SigV4.
  curl ca-certificates
  # The e2e node: container runtime, CNI plugins, image tools, kube-proxy's iptables.
  containerd runc containernetworking-plugins umoci busybox-static iptables conntrack util-linux
  gcc libc6-dev file binutils
  # The example shop's image (examples/django), which the SchemaRollout tests migrate.
  python3-django python3-psycopg2)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps.sh: installing ${missing[*]}" >&2
  SUDO=""
  [[ "$(id -u)" == 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian's postgresql package starts a cluster of its own on 5432; the tests never use it.
# Django and psycopg 3 for the router's driver tests, in a virtualenv of their own.
VENV="${SILO_CACHE:-$HOME/.cache/silo}/venv"
if ! "$VENV/bin/python" -c "import django, psycopg" 2>/dev/null; then
  python3 -m venv "$VENV" || { apt-get install -y -qq python3-venv >/dev/null && python3 -m venv "$VENV"; }
  "$VENV/bin/pip" install -q "django>=5.2,<6" "psycopg[binary]>=3.2,<4"
fi
for tool in go cargo python3; do
  command -v "$tool" >/dev/null || { echo "install-deps.sh: $tool is required" >&2; exit 1; }
done
