#!/usr/bin/env bash
# The local end-to-end run, by hand: the same as tests/test_e2e_local.py (which CI runs with the suite).
#
#   e2e/local.sh [pytest options]        e.g. e2e/local.sh -x --timeout 600
#
# On a throwaway control plane (etcd + kube-apiserver + kube-controller-manager from
# scripts/install-test-cluster.sh, built once into ~/.cache/lmkube) with the kubelet emulator standing in
# for nodes (pods run as local processes from .venv), it:
#   1. helm installs charts/lmkube (2 operator replicas with kopf peering, watching one namespace);
#      the operator pods log in with the chart's ServiceAccount token (TokenRequest API);
#   2. kubectl applies e2e/localmodel.yaml, with HF_ENDPOINT pointing at a local Hugging Face stand-in
#      that serves a tiny generated GGUF under the example's repo and file name;
#   3. waits for Ready, chats through the model's endpoint with the official openai SDK and the token
#      from the model's Secret;
#   4. kubectl deletes the LocalModel (the server unloads, owned objects are garbage-collected) and
#      helm uninstalls the release.
# Then the same image and failure modes on a real node (tests/test_real_node*.py: kubelet + containerd +
# runc, kube-scheduler, kube-proxy; `kubectl get nodes -o wide` shows CONTAINER-RUNTIME containerd://...).
# Timings are printed as [e2e-local] and [real-node] lines. Needs: the repo's .venv (scripts/setup-venv.sh) and Go for
# the first build of the cluster binaries. For a real cluster, see e2e/cluster.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[ -x .venv/bin/pytest ] || { echo "no .venv: run scripts/setup-venv.sh first" >&2; exit 1; }
exec .venv/bin/pytest tests/test_e2e_local.py tests/test_real_node.py tests/test_real_node_image.py -s -v \
  -p no:cacheprovider "$@"
