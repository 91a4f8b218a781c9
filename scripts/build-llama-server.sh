#!/usr/bin/env bash
# Builds llama.cpp's llama-server, llama-batched-bench and llama-quantize (CPU, Release) from the llama.cpp
# source bundled in the llama-cpp-python sdist lmkube uses, so the peers in bench/ run the same library
# version as lmkube. Built once into ~/.cache/lmkube/llama.cpp-<version>/bin; re-runs only print that folder.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
cache=${LMKUBE_CACHE:-$HOME/.cache/lmkube}
dest="$cache/llama.cpp-$LLAMA_CPP_PYTHON_VERSION"
targets=(llama-server llama-batched-bench llama-quantize)

have_all() {
  local t
  for t in "${targets[@]}"; do [ -x "$dest/bin/$t" ] || return 1; done
}
if have_all; then
  echo "$dest/bin"
  exit 0
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pip="$root/.venv/bin/python -m pip"
[ -x "$root/.venv/bin/python" ] || pip="python3 -m pip"
work=$(mktemp -d "${TMPDIR:-/tmp}/llama-cpp-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "Building llama.cpp from llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist into $dest (once) ..." >&2
start=$(date +%s)
$pip download --quiet --disable-pip-version-check --no-binary :all: --no-deps \
  "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work" --wildcards '*/vendor/llama.cpp/*'
src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
# Same defaults as the llama-cpp-python wheel build (GGML_NATIVE on: this machine's instruction set).
cmake -S "$src" -B "$work/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$work/build" --config Release -j "$(nproc)" --target "${targets[@]}" >&2

mkdir -p "$dest.tmp/bin"
for t in "${targets[@]}"; do cp "$work/build/bin/$t" "$dest.tmp/bin/"; done
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "built in $(( $(date +%s) - start )) s" > "$dest/BUILD_TIME"
echo "Built in $(( $(date +%s) - start )) s" >&2
echo "$dest/bin"
