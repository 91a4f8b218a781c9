#!/usr/bin/env bash
# The local end-to-end run, by hand: the same as tests/test_e2e_local.py (which CI runs with the suite), then
# the real node's own checks.
#
#   e2e/local.sh [pytest options]        e.g. e2e/local.sh -x --timeout 900
#
# On a throwaway cluster started for the run (docs/testing.md): etcd + kube-apiserver +
# kube-controller-manager + kube-scheduler, and a real node: kubelet + containerd + runc + a CNI bridge +
# kube-proxy (scripts/install-test-cluster.sh builds and installs them once, cached by version), with the
# project's CPU image (scripts/build-image.sh, rebuilt only when the sources changed) imported into the node's
# containerd, it:
#   1. helm installs charts/lmkube with that image (imagePullPolicy Never): 2 operator pods with kopf peering,
#      watching one namespace, logged in with the chart's ServiceAccount through the `kubernetes` Service;
#   2. kubectl applies e2e/localmodel.yaml, with HF_ENDPOINT pointing at a local Hugging Face stand-in on the
#      node's bridge address that serves a small generated GGUF under the example's repo and file name;
#   3. waits for Downloading (with a percent) and Ready, chats through the model's Service with the official
#      openai SDK and the token from the model's Secret, and from a client pod at status.endpoint;
#   4. kubectl deletes the LocalModel (the server unloads, owned objects are garbage-collected) and
#      helm uninstalls the release.
# Then the failure modes on the same node (tests/test_real_node*.py). It prints `kubectl get nodes -o wide`
# (CONTAINER-RUNTIME containerd://...) and the timings ([real-node] and [e2e-local] lines).
# Needs: root, the repo's .venv (scripts/setup-venv.sh), Go for the first build of the cluster binaries and
# buildah for the image (scripts/install-image-tools.sh). For a real cluster, see e2e/cluster.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[ -x .venv/bin/pytest ] || { echo "no .venv: run scripts/setup-venv.sh first" >&2; exit 1; }
bash scripts/install-test-cluster.sh > /dev/null
began=$SECONDS
status=0
.venv/bin/pytest tests/test_e2e_local.py tests/test_real_node.py tests/test_real_node_image.py -s -v \
  -p no:cacheprovider --timeout 1800 "$@" || status=$?
echo "[e2e-local] whole run (cluster bring-up, image import, e2e, real-node checks, teardown): $((SECONDS - began))s"
exit $status
