#!/usr/bin/env bash
# Installs what scripts/build-image.sh needs: buildah (builds and runs the image without a Docker daemon)
# and debootstrap (makes the local Debian base image). Debian/Ubuntu packages, installed with apt-get
# only when missing, so a repeat run is instant. Needs root for the install (uses sudo when available).
set -euo pipefail

missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
[ ${#missing[@]} -eq 0 ] && exit 0

command -v apt-get >/dev/null || {
  echo "install ${missing[*]} with your package manager (apt-get not found)" >&2
  exit 1
}
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
echo "[install-image-tools] apt-get install ${missing[*]} ..." >&2
"${sudo[@]}" apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
