#!/usr/bin/env bash
# Builds the lmkube server image from the Dockerfile with buildah: no Docker daemon, no registry needed.
#
# Usage: scripts/build-image.sh [--backend cpu|cuda] [--base-image IMAGE] [--builder-image IMAGE]
#                               [--tag NAME:TAG] [--push PREFIX] [--refresh-base]
#   --backend        cpu (default) or cuda (the Dockerfile's BACKEND build arg; tag gets a -cuda suffix)
#   --base-image     final-stage base (CPU default: a local Debian bookworm image made with debootstrap,
#                    so nothing is pulled; CUDA default: the Dockerfile's nvidia/cuda runtime image)
#   --builder-image  builder-stage base (default: --base-image for CPU, the Dockerfile's nvidia/cuda
#                    devel image for CUDA)
#   --tag            image name (default lmkube/lmkube:<version>[-cuda], version from lmkube/__init__.py)
#   --push PREFIX    also push to PREFIX/lmkube:<tag>, e.g. --push registry.example.com/team
#                    (log in first: buildah login --authfile ... or REGISTRY_AUTH_FILE)
#   --refresh-base   rebuild the debootstrap base image even if it is cached
#
# Everything is cached under ${LMKUBE_CACHE:-$HOME/.cache/lmkube}/image: buildah's storage (root and
# runroot; layers are reused with --layers, so a rebuild after a source change takes seconds to a few
# minutes and the llama.cpp compile happens once) and the base image localhost/lmkube-base:bookworm.
# Needs root (or `buildah unshare`), buildah and debootstrap (scripts/install-image-tools.sh).
#
# A TLS-intercepting proxy: the host CA bundle (LMKUBE_BUILD_CA_BUNDLE, else SSL_CERT_FILE, PIP_CERT or
# /etc/ssl/certs/ca-certificates.crt) and a pip config naming it reach the build as secrets (see the
# Dockerfile); PIP_INDEX_URL / PIP_EXTRA_INDEX_URL are carried into that pip config when set.
#
# stdout is only KEY=VALUE lines (progress goes to stderr), for `eval` or the tests:
#   LMKUBE_IMAGE=localhost/lmkube/lmkube:0.1.0
#   LMKUBE_BUILDAH_ROOT=... LMKUBE_BUILDAH_RUNROOT=... LMKUBE_BUILDAH_STORAGE_DRIVER=vfs
#   LMKUBE_PUSHED_IMAGE=registry.example.com/team/lmkube:0.1.0   (with --push)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${LMKUBE_CACHE:-$HOME/.cache/lmkube}
image_cache=$cache/image
driver=${LMKUBE_BUILDAH_STORAGE_DRIVER:-vfs}
debian_mirror=${LMKUBE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
local_base=localhost/lmkube-base:bookworm

backend=cpu base_image="" builder_image="" tag="" push="" refresh_base=0
while [ $# -gt 0 ]; do
  case "$1" in
    --backend) backend=${2:?}; shift ;;
    --base-image) base_image=${2:?}; shift ;;
    --builder-image) builder_image=${2:?}; shift ;;
    --tag) tag=${2:?}; shift ;;
    --push) push=${2:?}; shift ;;
    --refresh-base) refresh_base=1 ;;
    -h|--help) sed -n '2,31p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
case "$backend" in cpu|cuda) ;; *) echo "--backend must be cpu or cuda, got $backend" >&2; exit 2 ;; esac

log() { echo "[build-image] $*" >&2; }
need() { command -v "$1" >/dev/null || { echo "$1 is needed: run scripts/install-image-tools.sh" >&2; exit 1; }; }
need buildah

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$root/lmkube/__init__.py")
llama_version=$(sed -n 's/^ *"llama-cpp-python==\([^"]*\)",$/\1/p' "$root/pyproject.toml")
[ -n "$version" ] && [ -n "$llama_version" ] || { echo "cannot read versions from the sources" >&2; exit 1; }
suffix=""; [ "$backend" = cuda ] && suffix=-cuda
tag=${tag:-lmkube/lmkube:$version$suffix}

mkdir -p "$image_cache/storage" "$image_cache/run"
bh=(buildah --root "$image_cache/storage" --runroot "$image_cache/run" --storage-driver "$driver")

# One build at a time per cache (the tests and a person may both run this).
exec 9>"$image_cache/lock"
flock 9

# The local stand-in for python:3.11-slim-bookworm: bookworm's own Python 3.11, with venv and CA certs.
make_base() {
  local work rootfs ctr mnt start=$SECONDS
  log "making $local_base with debootstrap ($debian_mirror) ..."
  work=$(mktemp -d "$image_cache/debootstrap.XXXXXX")
  rootfs=$work/rootfs
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
    bookworm "$rootfs" "$debian_mirror" > "$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; rm -rf "$work"; return 1; }
  cat > "$rootfs/etc/apt/sources.list" <<EOF
deb $debian_mirror bookworm main
deb $debian_mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
  # As Debian's official images: no apt caches, no recommends, no docs beyond copyright files.
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' > "$rootfs/etc/apt/apt.conf.d/90lmkube"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
    "$rootfs"/dev/* "$rootfs"/proc/* "$rootfs"/sys/* "$rootfs"/run/* "$rootfs"/tmp/*
  ctr=$("${bh[@]}" from scratch)
  mnt=$("${bh[@]}" mount "$ctr")
  tar -C "$rootfs" -cf - . | tar -C "$mnt" -xpf -
  "${bh[@]}" umount "$ctr" >/dev/null
  "${bh[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd /bin/bash --label org.opencontainers.image.description="Debian bookworm minbase + Python 3.11 (debootstrap)" \
    "$ctr"
  "${bh[@]}" commit --quiet --rm "$ctr" "$local_base" >/dev/null
  rm -rf "$work"
  log "base image ready in $((SECONDS - start)) s"
}

if [ "$backend" = cpu ] && [ -z "$base_image" ]; then
  if [ "$refresh_base" = 1 ] && "${bh[@]}" inspect --type image "$local_base" >/dev/null 2>&1; then
    "${bh[@]}" rmi -f "$local_base" >/dev/null
  fi
  "${bh[@]}" inspect --type image "$local_base" >/dev/null 2>&1 || { need debootstrap; make_base; }
  base_image=$local_base
fi

args=(--build-arg "BACKEND=$backend" --build-arg "LLAMA_CPP_PYTHON_VERSION=$llama_version"
      --build-arg "VERSION=$version")
revision=$(git -C "$root" rev-parse HEAD 2>/dev/null || true)
[ -n "$revision" ] && args+=(--build-arg "REVISION=$revision")
stage=${backend^^}
[ -n "$base_image" ] && args+=(--build-arg "${stage}_BASE_IMAGE=$base_image")
builder_image=${builder_image:-$([ "$backend" = cpu ] && echo "$base_image" || true)}
[ -n "$builder_image" ] && args+=(--build-arg "${stage}_BUILDER_IMAGE=$builder_image")

# Build secrets: mounted into the RUN steps only, never part of a layer.
secrets=$(mktemp -d)
trap 'rm -rf "$secrets"' EXIT
ca=${LMKUBE_BUILD_CA_BUNDLE:-${SSL_CERT_FILE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}}
{
  echo "[global]"
  if [ -s "$ca" ]; then
    echo "cert = /run/secrets/ca-bundle"
    args+=(--secret "id=ca-bundle,src=$ca")
  fi
  [ -n "${PIP_INDEX_URL:-}" ] && echo "index-url = $PIP_INDEX_URL"
  [ -n "${PIP_EXTRA_INDEX_URL:-}" ] && echo "extra-index-url = $PIP_EXTRA_INDEX_URL"
  [ -n "${PIP_DEFAULT_TIMEOUT:-}" ] && echo "timeout = $PIP_DEFAULT_TIMEOUT"
  true
} > "$secrets/pip.conf"
args+=(--secret "id=pip.conf,src=$secrets/pip.conf")

log "building $tag (backend $backend${base_image:+, base $base_image}) ..."
start=$SECONDS
# --format docker: the manifest type every registry and container runtime accepts; OCI labels are kept.
bud=("${bh[@]}" bud --isolation chroot --network host --layers --format docker "${args[@]}" -f "$root/Dockerfile")
# The builder stage is tagged too: the final image does not descend from it, so its cached layers (the
# llama.cpp compile above all) would otherwise count as dangling and go with the prune below.
"${bud[@]}" --target builder -t "localhost/lmkube-builder:$backend" "$root" >&2
"${bud[@]}" -t "$tag" "$root" >&2
log "built $tag in $((SECONDS - start)) s"
# Leftovers of earlier builds (a superseded image, its old source layers); tagged chains stay.
"${bh[@]}" rmi --prune >/dev/null 2>&1 || true

image=$("${bh[@]}" inspect --type image --format '{{.FromImage}}' "$tag" 2>/dev/null || echo "localhost/$tag")
echo "LMKUBE_IMAGE=$image"
echo "LMKUBE_BUILDAH_ROOT=$image_cache/storage"
echo "LMKUBE_BUILDAH_RUNROOT=$image_cache/run"
echo "LMKUBE_BUILDAH_STORAGE_DRIVER=$driver"

if [ -n "$push" ]; then
  target=${push%/}/${tag##*/}
  log "pushing $target ..."
  "${bh[@]}" push "$tag" "docker://$target" >&2
  echo "LMKUBE_PUSHED_IMAGE=$target"
fi
