#!/usr/bin/env bash
# End-to-end run on a real (GPU) Kubernetes cluster: build and push the images, install the chart,
# serve a small real model from Hugging Face, chat with it from a pod inside the cluster, clean up.
#
#   e2e/cluster.sh --registry registry.example.com/team [options]
#
# Needs: kubectl (current context = the target cluster, or --context), helm 3, buildah (for the build;
# skip it with --skip-build when the images are already in the registry) and push rights to --registry.
# The cluster needs a default StorageClass (or --storage-class), nodes with the GPU resource for --gpus > 0
# (NVIDIA device plugin: nvidia.com/gpu), and egress to huggingface.co (or HF_ENDPOINT via --hf-endpoint).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$ROOT/lmkube/__init__.py")"

REGISTRY=""
TAG="$VERSION"
CONTEXT=""
RELEASE="lmkube"
OPERATOR_NAMESPACE="lmkube-system"
NAMESPACE="lmkube-e2e"
MODEL="Qwen/Qwen2.5-0.5B-Instruct-GGUF"
VARIANT="q4_k_m"
GPUS=1
GPU_RESOURCE="nvidia.com/gpu"
STORAGE_CLASS=""
HF_ENDPOINT_URL=""
TIMEOUT="30m"
SKIP_BUILD=0
KEEP=0

usage() {
  cat <<USAGE
Usage: e2e/cluster.sh --registry REGISTRY [options]

  --registry REG         image registry/prefix to push to and pull from (required), e.g. ghcr.io/acme
  --tag TAG              image tag (default: $VERSION; CUDA server image: TAG-cuda)
  --context NAME         kubectl/helm context (default: current)
  --namespace NS         namespace of the test LocalModel (default: $NAMESPACE)
  --operator-namespace NS  namespace of the chart release (default: $OPERATOR_NAMESPACE)
  --model REPO           Hugging Face repo with GGUF files (default: $MODEL)
  --variant Q            quantization (default: $VARIANT)
  --gpus N               GPUs per model pod; 0 runs on CPU with the CPU image (default: $GPUS)
  --gpu-resource NAME    extended resource name (default: $GPU_RESOURCE)
  --storage-class NAME   StorageClass of the model cache PVC (default: cluster default)
  --hf-endpoint URL      Hugging Face mirror for the model pods (default: huggingface.co)
  --timeout DURATION     how long to wait for Ready (default: $TIMEOUT)
  --skip-build           use images already in the registry
  --keep                 leave everything installed at the end
USAGE
}

while [ $# -gt 0 ]; do
  case "$1" in
    --registry) REGISTRY="$2"; shift 2 ;;
    --tag) TAG="$2"; shift 2 ;;
    --context) CONTEXT="$2"; shift 2 ;;
    --namespace) NAMESPACE="$2"; shift 2 ;;
    --operator-namespace) OPERATOR_NAMESPACE="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --variant) VARIANT="$2"; shift 2 ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --gpu-resource) GPU_RESOURCE="$2"; shift 2 ;;
    --storage-class) STORAGE_CLASS="$2"; shift 2 ;;
    --hf-endpoint) HF_ENDPOINT_URL="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[ -n "$REGISTRY" ] || { echo "--registry is required" >&2; usage >&2; exit 2; }

KUBECTL=(kubectl)
HELM=(helm)
if [ -n "$CONTEXT" ]; then
  KUBECTL+=(--context "$CONTEXT")
  HELM+=(--kube-context "$CONTEXT")
fi
REPOSITORY="${REGISTRY%/}/lmkube"
LM_NAME="e2e-chat"
log() { printf '\n==> %s\n' "$*" >&2; }

cleanup() {
  local status=$?
  if [ "$KEEP" = 1 ]; then
    log "--keep: leaving release $RELEASE and namespace $NAMESPACE in place"
    exit "$status"
  fi
  log "cleaning up"
  "${KUBECTL[@]}" -n "$NAMESPACE" delete localmodel "$LM_NAME" --ignore-not-found --wait=true --timeout=2m || true
  "${KUBECTL[@]}" -n "$NAMESPACE" delete pod e2e-client --ignore-not-found --wait=false || true
  "${HELM[@]}" uninstall "$RELEASE" -n "$OPERATOR_NAMESPACE" --wait || true
  "${KUBECTL[@]}" delete namespace "$NAMESPACE" --ignore-not-found --wait=false || true
  exit "$status"
}

if [ "$SKIP_BUILD" = 0 ]; then
  log "building and pushing $REPOSITORY:$TAG (CPU: operator and CPU model pods)"
  # build-image.sh pushes the local image NAME:TAG to REGISTRY/lmkube:TAG (log in first, see its header).
  "$ROOT/scripts/build-image.sh" --tag "lmkube/lmkube:$TAG" --push "$REGISTRY"
  if [ "$GPUS" -gt 0 ]; then
    log "building and pushing $REPOSITORY:$TAG-cuda (GPU model pods)"
    "$ROOT/scripts/build-image.sh" --backend cuda --tag "lmkube/lmkube:$TAG-cuda" --push "$REGISTRY"
  fi
fi

trap cleanup EXIT

log "installing the chart (release $RELEASE in $OPERATOR_NAMESPACE)"
"${HELM[@]}" upgrade --install "$RELEASE" "$ROOT/charts/lmkube" -n "$OPERATOR_NAMESPACE" --create-namespace \
  --set image.repository="$REPOSITORY" --set image.tag="$TAG" --set image.pullPolicy=Always \
  --set modelDefaults.gpu.resource="$GPU_RESOURCE" --wait --timeout 5m
"${KUBECTL[@]}" create namespace "$NAMESPACE" --dry-run=client -o yaml | "${KUBECTL[@]}" apply -f -

log "applying LocalModel $NAMESPACE/$LM_NAME ($MODEL@$VARIANT, $GPUS GPU)"
{
  cat <<YAML
apiVersion: lmkube.dev/v1alpha1
kind: LocalModel
metadata:
  name: $LM_NAME
  namespace: $NAMESPACE
spec:
  model: $MODEL
  variant: $VARIANT
  contextLength: 4096
  parallel: 2
  gpu:
    count: $GPUS
    resource: $GPU_RESOURCE
YAML
  if [ -n "$STORAGE_CLASS" ]; then
    printf '  storage:\n    size: 5Gi\n    storageClassName: %s\n' "$STORAGE_CLASS"
  else
    printf '  storage:\n    size: 5Gi\n'
  fi
  if [ -n "$HF_ENDPOINT_URL" ]; then
    printf '  env:\n    - name: HF_ENDPOINT\n      value: %s\n' "$HF_ENDPOINT_URL"
  fi
} | "${KUBECTL[@]}" apply -f -

log "waiting up to $TIMEOUT for phase Ready (kubectl get lm -n $NAMESPACE -w shows progress)"
started=$(date +%s)
if ! "${KUBECTL[@]}" -n "$NAMESPACE" wait "localmodel/$LM_NAME" --for=jsonpath='{.status.phase}'=Ready --timeout="$TIMEOUT"; then
  "${KUBECTL[@]}" -n "$NAMESPACE" describe localmodel "$LM_NAME" >&2 || true
  "${KUBECTL[@]}" -n "$NAMESPACE" get pods -o wide >&2 || true
  echo "LocalModel did not become Ready" >&2
  exit 1
fi
log "Ready after $(( $(date +%s) - started )) s"
"${KUBECTL[@]}" -n "$NAMESPACE" get localmodel "$LM_NAME" -o wide

ENDPOINT="$("${KUBECTL[@]}" -n "$NAMESPACE" get localmodel "$LM_NAME" -o jsonpath='{.status.endpoint}')"
MODEL_KEY="$("${KUBECTL[@]}" -n "$NAMESPACE" get localmodel "$LM_NAME" -o jsonpath='{.status.modelKey}')"

log "chat completion from a pod inside the cluster ($ENDPOINT, model $MODEL_KEY)"
# The client pod runs the lmkube image's Python with the token from the model's Secret, as any
# in-cluster application would.
"${KUBECTL[@]}" -n "$NAMESPACE" run e2e-client --restart=Never --rm -i --quiet \
  --image="$REPOSITORY:$TAG" --image-pull-policy=Always \
  --overrides="$(cat <<JSON
{"spec": {"containers": [{
  "name": "e2e-client", "image": "$REPOSITORY:$TAG", "command": ["python", "-c"],
  "args": ["import json, os, httpx\nr = httpx.post(os.environ['ENDPOINT'] + '/v1/chat/completions', headers={'Authorization': 'Bearer ' + os.environ['TOKEN']}, json={'model': os.environ['MODEL_KEY'], 'messages': [{'role': 'user', 'content': 'Say hello in five words.'}], 'max_tokens': 32}, timeout=300)\nr.raise_for_status()\nbody = r.json()\nprint(json.dumps(body, indent=2))\nassert body['choices'][0]['message']['content'].strip(), 'empty completion'"],
  "env": [
    {"name": "ENDPOINT", "value": "$ENDPOINT"},
    {"name": "MODEL_KEY", "value": "$MODEL_KEY"},
    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "lm-$LM_NAME-token", "key": "token"}}}
  ],
  "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "allowPrivilegeEscalation": false,
                      "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
}]}}
JSON
)"

log "deleting the LocalModel: the operator unloads the model and its objects are garbage-collected"
"${KUBECTL[@]}" -n "$NAMESPACE" delete localmodel "$LM_NAME" --wait=true --timeout=5m
for kind in statefulset service pvc secret; do
  for _ in $(seq 60); do
    "${KUBECTL[@]}" -n "$NAMESPACE" get "$kind" -l app.kubernetes.io/instance="$LM_NAME" -o name | grep -q . || break
    sleep 2
  done
  if "${KUBECTL[@]}" -n "$NAMESPACE" get "$kind" -l app.kubernetes.io/instance="$LM_NAME" -o name | grep -q .; then
    echo "$kind of $LM_NAME still present after deletion" >&2
    exit 1
  fi
done
log "end-to-end run passed"
