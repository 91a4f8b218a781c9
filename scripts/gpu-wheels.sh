#!/usr/bin/env bash
# Prepares, on a machine with network access, everything scripts/gpu-check.sh needs on the offline GPU machine
# (docs/gpu.md): lmkube's dependencies as CPython 3.12 manylinux x86_64 wheels, and llama-cpp-python's sdist
# (the pinned version) pruned to what the CUDA build, llama-server, llama-quantize and llama-batched-bench need.
#
#   .gpu/carry/                      the one folder the device tool carries (`carry: [".gpu/carry"]`)
#     llama-cpp-python-<v>-src.tar.xz  the pruned sdist
#     wheels/                        wheels the GPU machine's image lacks (or has only as small pure-Python ones)
#   .gpu/host-wheels/                wheels the GPU image already has (large ones): only a CPU run here needs them
#
# The device tool carries at most 64 MiB (the working tree included): the script prints the sizes and fails when
# the tree plus .gpu/carry exceed that. Re-runs reuse the downloaded sdist.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

LLAMA_CPP_PYTHON_VERSION=0.3.36  # keep in step with scripts/setup-venv.sh and pyproject.toml
CARRY_LIMIT_MIB=64
python=${PYTHON:-python3}
gpu=.gpu
carry=$gpu/carry
cache=${LMKUBE_CACHE:-$HOME/.cache/lmkube}/gpu-check
mkdir -p "$carry" "$cache"

# Packages the GPU machine's image holds (/work/.library/device/KINDS.md, read 2026-11-17). Their wheels stay
# out of the carry when they are large; the small ones travel anyway, so an old version there cannot block pip.
image_packages=" aiohttp aiosignal anyio attrs certifi charset-normalizer click cmake filelock frozenlist fsspec h11
 hf-xet httpcore httpx huggingface-hub idna jinja2 markdown-it-py markupsafe mdurl multidict ninja numpy packaging
 pathspec pip pluggy prometheus-client propcache psutil pygments pytest pytest-timeout pyyaml requests rich
 scikit-build-core setuptools shellingham six tqdm typer typing-extensions urllib3 uvloop websockets wheel yarl "
# Not needed by the GPU check: the linter and the fuzz test's schemathesis (and what only it pulls in).
skip_packages=" ruff schemathesis hypothesis hypothesis-graphql hypothesis-jsonschema graphql-core jsonschema-rs
 werkzeug harfile pyrate-limiter starlette-testclient junit-xml tomli-w pytest-subtests backoff "
# pip's isolated builds (llama-cpp-python's, lmkube's) take their backends from the carried wheels alone.
build_packages=" setuptools wheel scikit-build-core packaging pathspec "
large_bytes=$((512 * 1024))

# 1. The sdist, pruned: its git history, the llama.cpp models, docs, tests, web UI sources and other GPU backends go.
sdist=$(ls "$cache"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION".tar.gz 2>/dev/null || true)
if [ -z "$sdist" ]; then
  "$python" -m pip download --quiet --disable-pip-version-check --no-binary :all: --no-deps \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$cache"
  sdist="$cache/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-wheels.XXXXXX")
trap 'rm -rf "$work"' EXIT
tar -xzf "$sdist" -C "$work"
src="$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
l="$src/vendor/llama.cpp"
rm -rf "$src"/{.git,docs,examples,tests,docker,scripts} "$l/.git" \
  "$l"/{models,docs,benches,tests,media,examples,pocs,gguf-py,conversion,requirements,grammars,skills,app,ci} \
  "$l"/*.py "$l"/build-xcframework.sh
find "$l/scripts" -mindepth 1 -not -name ui-assets.cmake -delete
# ggml's CMake only descends into the backends that are switched on: keep the CPU and CUDA ones.
find "$l/ggml/src" -mindepth 1 -maxdepth 1 -type d -name 'ggml-*' -not -name ggml-cpu -not -name ggml-cuda \
  -exec rm -rf {} +
# The web UI is neither built (LLAMA_BUILD_UI=OFF) nor downloaded (LLAMA_USE_PREBUILT_UI=OFF): only its CMake
# files stay, which make llama-server's placeholder page.
find "$l/tools/ui" -mindepth 1 -maxdepth 1 -not -name CMakeLists.txt -not -name sources.cmake \
  -not -name 'ui.*.in' -exec rm -rf {} +
# tools/: the three tools the check runs. mtmd (llama-server links it) is added by llama-cpp-python's own
# CMakeLists (LLAVA_BUILD), so it must not be added here a second time.
find "$l/tools" -mindepth 1 -maxdepth 1 -type d -not -name server -not -name quantize -not -name batched-bench \
  -not -name ui -not -name mtmd -exec rm -rf {} +
cat > "$l/tools/CMakeLists.txt" <<'EOF'
# Pruned by lmkube's scripts/gpu-wheels.sh: only what scripts/gpu-check.sh runs.
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(batched-bench)
add_subdirectory(quantize)
add_subdirectory(ui)
add_subdirectory(server)
EOF
archive="$carry/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-src.tar.xz"
XZ_OPT=-6 tar -cJf "$archive.tmp" -C "$work" "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
mv "$archive.tmp" "$archive"

# 2. The wheels: lmkube's dependencies (without llama-cpp-python, built there), llama-cpp-python's own, the test
#    tools the check's test subset uses, and the build backends pip needs offline (scikit-build-core, setuptools).
"$python" - > "$work/requirements.txt" <<'EOF'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
skip = ("llama-cpp-python", "ruff", "schemathesis")
for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
    if not req.startswith(skip):
        print(req)
print("diskcache>=5.6.1\ntyping-extensions>=4.5.0\nscikit-build-core>=0.9.2\nsetuptools>=77\nwheel")
EOF
rm -rf "$work/wheels"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
    manylinux_2_5_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
"$python" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 "${platforms[@]}" -d "$work/wheels" -r "$work/requirements.txt"
rm -rf "$carry/wheels" "$gpu/host-wheels"
mkdir -p "$carry/wheels" "$gpu/host-wheels"
for wheel in "$work"/wheels/*.whl; do
  file=$(basename "$wheel")
  name=$(echo "${file%%-*}" | tr 'A-Z_.' 'a-z--')
  if [[ "$skip_packages" == *" $name "* ]]; then
    continue
  elif [[ "$image_packages" == *" $name "* ]] && [[ "$build_packages" != *" $name "* ]] \
      && [ "$(stat -c %s "$wheel")" -gt "$large_bytes" ]; then
    mv "$wheel" "$gpu/host-wheels/"
  else
    mv "$wheel" "$carry/wheels/"
  fi
done

# 3. What travels: the tracked and untracked-not-ignored files, plus the carried folder.
tree_bytes=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
carry_bytes=$(du -sb "$carry" | cut -f1)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "sdist (pruned, xz): $(mib "$(stat -c %s "$archive")")"
echo "wheels carried:     $(mib "$(du -sb "$carry/wheels" | cut -f1)") in $(ls "$carry/wheels" | wc -l) files"
echo "host-only wheels:   $(mib "$(du -sb "$gpu/host-wheels" | cut -f1)") in $(ls "$gpu/host-wheels" | wc -l) files (not carried)"
echo "working tree:       $(mib "$tree_bytes")"
echo "total carried:      $(mib $((tree_bytes + carry_bytes))) of $CARRY_LIMIT_MIB MiB"
if [ $((tree_bytes + carry_bytes)) -gt $((CARRY_LIMIT_MIB * 1048576)) ]; then
  echo "over the device tool's carry limit" >&2
  exit 1
fi
