#!/usr/bin/env bash
# The GPU check of docs/gpu.md, as one time-boxed run: builds llama-cpp-python (the pinned version) with CUDA for the
# H200 only, installs lmkube from carried wheels, then runs, with full GPU offload, a short subset of the test suite,
# the memory estimate against measured GPU memory, and lmkube against llama-server (same build) at 1, 16 and 64
# streams. Everything it measures lands in $OUT (the device tool's output folder; .gpu/out here).
#
#   scripts/gpu-wheels.sh                 # first, where the package index is reachable: fills .gpu/carry
#   scripts/gpu-check.sh                  # on the GPU machine (offline): carry .gpu/carry
#   scripts/gpu-check.sh --cpu            # the same steps with CUDA off, small models, few streams (runs here)
#   scripts/gpu-check.sh --phase build    # only the build and install (a later --phase run reuses .gpu/work)
#
# Every step has a time limit; a step that fails or runs out is recorded in steps.tsv and the later steps that do not
# depend on it still run. Exit status: 0 when every step passed.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

LLAMA_CPP_PYTHON_VERSION=0.3.36  # keep in step with scripts/setup-venv.sh and pyproject.toml
mode=auto
phase=all
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) mode=cpu ;;
    --gpu) mode=gpu ;;
    --phase) phase=$2; shift ;;
    -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
if [ "$mode" = auto ]; then
  if command -v nvidia-smi >/dev/null && command -v nvcc >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    mode=gpu
  else
    mode=cpu
  fi
fi

carry=.gpu/carry
work=$root/.gpu/work/$mode
out=${OUT:-$root/.gpu/out}
mkdir -p "$work" "$out"
log=$out/gpu-check.log
steps=$out/steps.tsv
[ "$phase" = run ] || : > "$log"
[ -f "$steps" ] && [ "$phase" = run ] || printf 'step\trc\tseconds\tlimit_s\n' > "$steps"
failed=0

jobs=$(nproc)
if [ "$mode" = gpu ]; then
  python=${PYTHON:-python3}
  image_packages=yes  # the venv sees the image's numpy, uvloop, aiohttp, ... (scripts/gpu-wheels.sh)
  find_links="--find-links $carry/wheels"
  cmake_args="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90-real"
  limits=(venv=120 build=540 models=150 tests=150 memory=120 bench=150)
else
  # The wheels are CPython 3.12 ones; pyenv keeps a 3.12 beside the system Python on the development machines.
  # (its shim on PATH fails unless that version is selected, so the real binary comes first).
  python=${PYTHON:-$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)}
  python=${python:-$(command -v python3.12)}
  image_packages=""
  find_links="--find-links $carry/wheels --find-links .gpu/host-wheels"
  cmake_args=""
  limits=(venv=300 build=2400 models=300 tests=600 memory=300 bench=300)
fi
# Always the venv's interpreter (first on PATH), never another environment's `pip` script.
pip() { python -m pip --disable-pip-version-check "$@"; }
limit() { local kv; for kv in "${limits[@]}"; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }
venv=$work/venv
export PATH="$venv/bin:$PATH" PYTHONUNBUFFERED=1

# step NAME COMMAND...: runs COMMAND under NAME's time limit, output appended to the log, result to steps.tsv.
step() {
  local name=$1 seconds rc started
  shift
  seconds=$(limit "$name")
  echo "== $name (limit ${seconds}s) $(date -u +%T)" | tee -a "$log"
  started=$(date +%s.%N)
  # The steps are shell functions: timeout runs them in a fresh bash (see the exports below).
  timeout --kill-after=15 "$seconds" bash -c '"$@"' step "$@" >> "$log" 2>&1
  rc=$?
  local took
  took=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$seconds" >> "$steps"
  echo "   $name: rc=$rc in ${took}s" | tee -a "$log"
  [ "$rc" = 0 ] || failed=1
  return "$rc"
}

make_venv() {
  [ -n "$python" ] || { echo "no Python 3.12 found (set PYTHON=...)"; return 1; }
  "$python" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' || return 1
  if [ ! -x "$venv/bin/python" ]; then
    # Without ensurepip (some distributions' Pythons) the venv has no pip of its own: in GPU mode the image's pip,
    # seen through the .pth file below, installs into the venv all the same (`python -m pip`).
    "$python" -m venv "$venv" || { [ -n "$image_packages" ] && "$python" -m venv --without-pip "$venv"; } || return 1
    # The image's python3 is itself a venv, whose packages `--system-site-packages` would not show (that means
    # the base interpreter's): a .pth file puts its site-packages after the new venv's own.
    [ -z "$image_packages" ] || "$python" -c 'import site; print("\n".join(site.getsitepackages()))' \
      > "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/image-packages.pth"
  fi
  # Unpacked again only when the archive changed: fresh timestamps would make ninja recompile everything.
  local archive=$carry/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION-src.tar.xz sum
  sum=$(sha256sum < "$archive" | cut -c1-16)
  [ "$(cat "$work/src/.archive" 2>/dev/null)" = "$sum" ] && return 0
  rm -rf "$work/src" && mkdir -p "$work/src" && tar -xJf "$archive" -C "$work/src" && echo "$sum" > "$work/src/.archive"
}

build_llama() {
  local src=$work/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION
  # One CMake build gives the Python package's libraries and, from the same objects, llama-server, llama-quantize
  # and llama-batched-bench (the tools are switched on in the build the package makes; build-dir keeps it).
  rm -rf "$work/dist"
  CMAKE_ARGS="$cmake_args -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF \
-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=$jobs \
    pip wheel --no-index $find_links --no-deps -w "$work/dist" -C "build-dir=$work/build" "$src" || return 1
  local bin=$work/build/bin
  for tool in llama-server llama-quantize llama-batched-bench; do
    [ -x "$bin/$tool" ] || { echo "missing $bin/$tool"; return 1; }
  done
  # lmkube itself is installed, not linked: tests import the installed package, never the checkout's lmkube/.
  local fresh=("$work"/dist/llama_cpp_python-*.whl .)
  pip install --no-index $find_links "${fresh[@]}" pytest pytest-timeout openai anthropic kubernetes \
    prometheus-client || return 1
  # A venv kept from an earlier run already has both at the same version numbers: replace them anyway.
  pip install --no-index $find_links --force-reinstall --no-deps "${fresh[@]}" || return 1
  # On the GPU machine a build that cannot offload would turn every later figure into a CPU one: stop here.
  # (-I: the checkout's lmkube/ folder must not shadow the installed package.)
  python -I -c 'import sys, llama_cpp, lmkube.server
offload = bool(llama_cpp.llama_supports_gpu_offload())
print("llama_cpp", llama_cpp.__version__, "gpu offload", offload)
sys.exit(sys.argv[1] == "gpu" and not offload)' "$mode"
}

test_gpu=""
[ "$mode" = gpu ] && test_gpu=max
run_tests() {
  # The subset the issue names: chat, streaming, batching, prefix cache, speculative decoding, embeddings. Server
  # tests load with gpu "max" (the default); in-process engine tests offload with LMKUBE_TEST_GPU=max.
  set -o pipefail  # pytest's status, not tee's (the step's fresh bash does not inherit the option)
  LMKUBE_TEST_GPU=$test_gpu pytest -p no:cacheprovider -q -rfE --timeout 180 -o addopts="" \
    "tests/test_openai_api.py::test_chat_completion" \
    "tests/test_openai_api.py::test_greedy_chat_is_deterministic_and_streaming_matches" \
    "tests/test_openai_api.py::test_stream_include_usage_sends_a_final_usage_chunk" \
    "tests/test_openai_api.py::test_text_completion_and_stream" \
    "tests/test_openai_api.py::test_async_client_streams_concurrently" \
    "tests/test_openai_api.py::test_embeddings_float_and_base64" \
    "tests/test_openai_api.py::test_embeddings_batch_many_inputs" \
    "tests/test_server_concurrency.py::test_concurrent_chat_completions_match_sequential" \
    "tests/test_server_concurrency.py::test_concurrent_requests_behind_one_system_prompt_compute_it_once" \
    "tests/test_engine.py::test_concurrent_greedy_requests_match_one_at_a_time" \
    "tests/test_engine.py::test_prefix_cache_reuses_a_shared_prefix" \
    "tests/test_prefix_sharing.py::test_identical_concurrent_prompts_are_computed_once" \
    "tests/test_prefix_sharing.py::test_concurrent_prompts_behind_one_system_prompt_share_it" \
    "tests/test_speculative.py::test_greedy_output_is_identical_with_and_without_drafts" \
    "tests/test_speculative.py::test_openai_chat_with_draft_matches_plain_and_reports_stats" \
    2>&1 | tee "$out/pytest.log"
}

check() { python bench/gpu_check.py "$1" --mode "$mode" --work "$work" --out "$out"; }

export LLAMA_CPP_PYTHON_VERSION mode carry work out venv python image_packages find_links cmake_args jobs test_gpu
export -f pip make_venv build_llama run_tests check

{
  echo "gpu-check mode=$mode phase=$phase jobs=$jobs $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null)"
  uname -a
  [ "$mode" = gpu ] && { nvidia-smi; nvcc --version | tail -2; }
} >> "$log" 2>&1

if [ "$phase" != run ]; then
  step venv make_venv || exit 1
  # The F16 sources need only numpy and gguf: they are written while the libraries compile.
  pip install --quiet --no-index $find_links numpy gguf >> "$log" 2>&1
  # lmkube is not installed yet: synthetic_gguf comes from the checkout (lmkube/ is that package's folder).
  PYTHONPATH=$root timeout "$(limit build)" python bench/gpu_check.py sources --mode "$mode" --work "$work" \
    --out "$out" >> "$log" 2>&1 &
  sources_pid=$!
  step build build_llama
  build_rc=$?
  wait "$sources_pid" || { echo "writing the F16 sources failed" | tee -a "$log"; failed=1; }
  [ "$build_rc" = 0 ] || exit 1
fi
if [ "$phase" != build ]; then
  step models check models
  step tests run_tests
  step memory check memory
  step bench check bench
  python bench/gpu_check.py summary --mode "$mode" --work "$work" --out "$out" >> "$log" 2>&1 || failed=1
  [ -f "$out/summary.md" ] && cat "$out/summary.md"
fi
[ -d "$work/logs" ] && tar -czf "$out/server-logs.tar.gz" -C "$work" logs
exit "$failed"
