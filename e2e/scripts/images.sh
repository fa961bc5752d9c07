#!/usr/bin/env bash
# Container images for the e2e node, built without a registry or Docker (umoci), as OCI layout
# tarballs that `ctr images import` takes:
#   images.sh pause OUT.tar             the pod sandbox image localhost/pause:v1 (e2e/images/pause.c)
#   images.sh silo OUT.tar BIN_DIR TAG  localhost/silo:TAG with the contents the Dockerfile lists
#   images.sh shop OUT_DIR VERSION...   OUT_DIR/shop-VERSION.tar: localhost/shop:VERSION, the example
#                                       Django app (examples/django) with that version's migrations
#   images.sh contents                  prints what the silo image holds, from the Dockerfile
# The silo image takes its list of binaries, Debian packages, PATH, USER and ENTRYPOINT from the
# repository's Dockerfile; files of the Debian packages and the shared libraries they load come
# from this machine, with busybox standing in for the Debian base image's shell.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DOCKERFILE="$ROOT/Dockerfile"

dockerfile_arg() { sed -n "s/^ARG $1=\"\(.*\)\"$/\1/p" "$DOCKERFILE" | head -1; }
dockerfile_path() { sed -n 's/^ENV PATH=\(.*\)$/\1/p' "$DOCKERFILE" | tail -1; }
dockerfile_user() { awk '$1 == "USER" { u = $2 } END { print u }' "$DOCKERFILE"; }
dockerfile_entrypoint() {
  sed -n 's/^ENTRYPOINT \["\(.*\)"\]$/\1/p' "$DOCKERFILE" | tail -1
}

# Copies a file into the rootfs at the same path, following symlinks.
put() {
  local rootfs="$1" file="$2"
  mkdir -p "$rootfs$(dirname "$file")"
  cp -L "$file" "$rootfs$file"
}

# Copies the shared libraries an ELF file loads (and the loader) into the rootfs.
put_libs() {
  local rootfs="$1" file="$2" lib
  file -L "$file" | grep -q 'dynamically linked' || return 0
  for lib in $(ldd "$file" | grep -o '/[^ ]*'); do
    [[ -e "$rootfs$lib" ]] || put "$rootfs" "$lib"
  done
}

# Packs ROOTFS as NAME:TAG into an OCI layout tarball.
pack() {
  local rootfs="$1" tag="$2" out="$3"; shift 3
  local work layout
  work="$(mktemp -d)"
  layout="$work/layout"
  umoci init --layout "$layout"
  umoci new --image "$layout:$tag"
  umoci unpack --image "$layout:$tag" "$work/bundle" >/dev/null
  cp -a "$rootfs/." "$work/bundle/rootfs/"
  umoci repack --image "$layout:$tag" "$work/bundle"
  umoci config --image "$layout:$tag" "$@"
  umoci gc --layout "$layout"
  tar -C "$layout" -cf "$out.tmp" .
  mv "$out.tmp" "$out"
  rm -rf "$work"
}

pause_image() {
  local out="$1" work
  work="$(mktemp -d)"
  mkdir -p "$work/rootfs"
  gcc -static -Os -o "$work/rootfs/pause" "$ROOT/e2e/images/pause.c"
  pack "$work/rootfs" v1 "$out" --config.entrypoint /pause --config.user 65535:65535
  rm -rf "$work"
}

silo_image() {
  local out="$1" bin_dir="$2" tag="$3" work rootfs b pkg f
  work="$(mktemp -d)"
  rootfs="$work/rootfs"
  mkdir -p "$rootfs/usr/local/bin" "$rootfs/bin" "$rootfs/etc" "$rootfs/tmp"
  chmod 1777 "$rootfs/tmp"
  for b in $(dockerfile_arg SILO_BINARIES); do
    # Debug binaries carry hundreds of MB of DWARF; the image needs none of it.
    objcopy --strip-debug "$bin_dir/$b" "$rootfs/usr/local/bin/$b"
    put_libs "$rootfs" "$bin_dir/$b"
  done
  for pkg in $(dockerfile_arg SILO_DEBIAN_PACKAGES); do
    dpkg -s "$pkg" >/dev/null 2>&1 || { echo "images.sh: Debian package $pkg is not installed" >&2; exit 1; }
    while read -r f; do
      [[ -f "$f" && "$f" != /usr/share/doc/* && "$f" != /usr/share/man/* ]] || continue
      put "$rootfs" "$f"
      put_libs "$rootfs" "$f"
    done < <(dpkg -L "$pkg")
  done
  # The Debian base image's shell, for Jobs that run `sh -c`.
  cp /bin/busybox "$rootfs/bin/busybox"
  for b in sh cat env ls sleep; do ln -sf busybox "$rootfs/bin/$b"; done
  printf 'root:x:0:0:root:/root:/bin/sh\nnonroot:x:65532:65532:nonroot:/home/nonroot:/bin/sh\n' >"$rootfs/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"
  local entrypoint
  entrypoint="$(dockerfile_entrypoint)"
  pack "$rootfs" "$tag" "$out" --config.entrypoint "$entrypoint" \
    --config.user "$(dockerfile_user)" --config.env "PATH=$(dockerfile_path)"
  rm -rf "$work"
}

# The example shop (examples/django) at each VERSION, as OUT_DIR/shop-VERSION.tar: the Python
# packages its Dockerfile installs, with the Python and library packages they depend on, from this
# machine; the shared libraries their extensions load; the project with that version's migrations.
shop_images() {
  local out_dir="$1" work rootfs shop dockerfile packages pkg f version
  shift
  shop="$ROOT/examples/django"
  dockerfile="$shop/Dockerfile"
  work="$(mktemp -d)"
  rootfs="$work/rootfs"
  mkdir -p "$rootfs/app" "$rootfs/bin" "$rootfs/etc" "$rootfs/tmp"
  chmod 1777 "$rootfs/tmp"
  packages="$(sed -n 's/^ARG SHOP_DEBIAN_PACKAGES="\(.*\)"$/\1/p' "$dockerfile" | head -1)"
  for pkg in $packages; do
    dpkg -s "$pkg" >/dev/null 2>&1 || { echo "images.sh: Debian package $pkg is not installed" >&2; exit 1; }
  done
  # What they need of Python and its data; the C libraries come from ldd below.
  # shellcheck disable=SC2086
  for pkg in $(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
      --no-replaces --no-enhances $packages 2>/dev/null | grep -v '^ ' | sort -u \
      | grep -E '^(python3|libpython3|tzdata$|media-types$)'); do
    dpkg -s "$pkg" >/dev/null 2>&1 || continue
    while read -r f; do
      [[ -f "$f" && "$f" != /usr/share/doc/* && "$f" != /usr/share/man/* ]] || continue
      put "$rootfs" "$f"
    done < <(dpkg -L "$pkg")
  done
  while read -r f; do
    put_libs "$rootfs" "$f"
  done < <(find "$rootfs/usr" -type f \( -name '*.so*' -o -path '*/bin/python3*' \))
  cp -a "$shop/manage.py" "$shop/shop" "$shop/catalog" "$rootfs/app/"
  cp /bin/busybox "$rootfs/bin/busybox"
  for f in sh cat env ls sleep; do ln -sf busybox "$rootfs/bin/$f"; done
  printf 'root:x:0:0:root:/root:/bin/sh\nnonroot:x:65532:65532:nonroot:/home/nonroot:/bin/sh\n' >"$rootfs/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"
  mkdir -p "$out_dir"
  for version in "$@"; do
    rm -rf "$rootfs/app/catalog/migrations"
    cp -a "$shop/catalog/migrations" "$rootfs/app/catalog/migrations"
    sh "$shop/versions/select.sh" "$version" "$rootfs/app/catalog/migrations"
    pack "$rootfs" "$version" "$out_dir/shop-$version.tar" --config.entrypoint python3 \
      --config.entrypoint manage.py --config.workingdir /app --config.user 65532 \
      --config.env "PATH=/usr/local/bin:/usr/bin:/bin" --config.env "PYTHONDONTWRITEBYTECODE=1"
  done
  rm -rf "$work"
}

contents() {
  echo "binaries: $(dockerfile_arg SILO_BINARIES)"
  echo "debian-packages: $(dockerfile_arg SILO_DEBIAN_PACKAGES)"
  echo "path: $(dockerfile_path)"
  echo "user: $(dockerfile_user)"
  echo "entrypoint: $(dockerfile_entrypoint)"
}

case "${1:-}" in
  pause) pause_image "${2:?usage: images.sh pause OUT.tar}" ;;
  silo) silo_image "${2:?usage: images.sh silo OUT.tar BIN_DIR TAG}" "${3:?BIN_DIR}" "${4:?TAG}" ;;
  shop) shop_images "${2:?usage: images.sh shop OUT_DIR VERSION...}" "${@:3}" ;;
  contents) contents ;;
  *) echo "usage: images.sh pause|silo|shop|contents ..." >&2; exit 2 ;;
esac
