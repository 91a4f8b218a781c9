#!/usr/bin/env bash
# Installs what the operator/chart tests run against: a real control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, helm) and a real node (kubelet, kube-proxy, the pod
# sandbox "pause" binary; containerd, runc, the CNI plugins, nftables and busybox-static from Debian, see
# tests/real_node.py). The Kubernetes binaries are built from Go modules fetched through the Go module
# proxy (no other network access is needed), all in one Go build cache, into a cache outside the
# repository:
#
#   ${LMKUBE_CACHE:-$HOME/.cache/lmkube}/bin/<name>-<version>   (the build, keyed by version)
#   ${LMKUBE_CACHE:-$HOME/.cache/lmkube}/bin/<name>             (symlink to the selected version)
#
# Idempotent: a binary that is already in the cache is not rebuilt, so a repeat run is instant.
# On success it prints shell assignments on stdout (progress goes to stderr), e.g.
#   set -a; eval "$(scripts/install-test-cluster.sh)"; set +a   # exports LMKUBE_ETCD, ...
#
# Usage: scripts/install-test-cluster.sh [--selftest] [--no-kubectl] [--no-node]
#   --selftest    also start etcd + kube-apiserver on free loopback ports, wait for /readyz with a
#                 static bearer token (user in system:masters, RBAC on), run kubectl and helm
#                 against it, then stop both.
#   --no-kubectl  skip building kubectl (the Python kubernetes client can replace it).
#   --no-node     skip the real node's pieces (kubelet, kube-proxy, pause, the Debian packages).
#
# Versions can be overridden: K8S_VERSION, ETCD_VERSION (default: the etcd version that
# k8s.io/kubernetes itself requires), HELM_VERSION; ETCD_BIN=/path/to/etcd skips the etcd build
# and links that binary instead (Debian bookworm's etcd-server 3.4.23 passes --selftest too); GIE_VERSION, the
# Gateway API Inference Extension release whose InferencePool CRD the tests install (LMKUBE_GIE_CRD).
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.37.2}
HELM_VERSION=${HELM_VERSION:-v3.22.0}
GIE_VERSION=${GIE_VERSION:-v1.6.0}
ETCD_VERSION=${ETCD_VERSION:-}

selftest=0
with_kubectl=1
with_node=1
for arg in "$@"; do
  case "$arg" in
    --selftest) selftest=1 ;;
    --no-kubectl) with_kubectl=0 ;;
    --no-node) with_node=0 ;;
    -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

cache=${LMKUBE_CACHE:-$HOME/.cache/lmkube}
bin=$cache/bin
mkdir -p "$bin" "$cache/go/src"
export GOPATH=$cache/go GOMODCACHE=$cache/go/mod GOCACHE=$cache/go/build GOFLAGS=-mod=mod CGO_ENABLED=0
export GOWORK=off
command -v go >/dev/null || { echo "the Go toolchain (go) is needed" >&2; exit 1; }

log() { echo "[install-test-cluster] $*" >&2; }

# go_module_file MODULE VERSION -> path of that module's go.mod in the module cache.
go_module_file() {
  (cd "$cache/go/src" && go mod download -json "$1@$2") | sed -n 's/^\s*"GoMod": "\(.*\)",\?$/\1/p'
}

# build NAME VERSION WORKDIR PACKAGE LDFLAGS: builds PACKAGE (inside the Go module in WORKDIR)
# into $bin/NAME-VERSION once, and points $bin/NAME at it.
build() {
  local name=$1 version=$2 work=$3 pkg=$4 ldflags=$5
  local out=$bin/$name-$version
  if [ ! -x "$out" ]; then
    log "building $name $version ($pkg) ..."
    local start=$SECONDS
    (cd "$work" && go build -trimpath -ldflags "-s -w $ldflags" -o "$out.tmp" "$pkg")
    mv -f "$out.tmp" "$out"
    log "built $name $version in $((SECONDS - start))s"
  else
    log "$name $version already built ($out)"
  fi
  ln -sfn "$name-$version" "$bin/$name"
}

# A throwaway main module that requires MODULE@VERSION (plus extra go.mod text), under the cache.
make_module() {
  local dir=$1 module=$2 version=$3 extra=${4:-}
  mkdir -p "$dir"
  if [ ! -f "$dir/go.mod" ] || ! grep -qF "$module $version" "$dir/go.mod"; then
    rm -f "$dir/go.mod" "$dir/go.sum"
    printf 'module lmkube.local/tools\n\ngo %s\n\nrequire %s %s\n%s\n' \
      "$(go env GOVERSION | sed 's/^go//; s/^\([0-9]*\.[0-9]*\).*/\1/').0" "$module" "$version" "$extra" >"$dir/go.mod"
  fi
}

# --- kube-apiserver and kubectl: k8s.io/kubernetes + its staging modules (k8s.io/* v0.MINOR.PATCH)
k8s_mod=$(go_module_file k8s.io/kubernetes "$K8S_VERSION")
staging_version=v0.${K8S_VERSION#v1.}
replaces=$(sed -n 's|^\s*\(k8s\.io/[^ ]*\) => \./staging/.*|\t\1 => \1 '"$staging_version"'|p' "$k8s_mod")
[ -n "$replaces" ] || { log "no staging replaces found in $k8s_mod"; exit 1; }
k8s_dir=$cache/go/src/kubernetes-$K8S_VERSION
make_module "$k8s_dir" k8s.io/kubernetes "$K8S_VERSION" "$(printf '\nreplace (\n%s\n)' "$replaces")"
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
k8s_ldflags=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
done
build kube-apiserver "$K8S_VERSION" "$k8s_dir" k8s.io/kubernetes/cmd/kube-apiserver "$k8s_ldflags"
# The real controllers (Deployment -> ReplicaSet -> Pods, garbage collection, ServiceAccounts, ...);
# tests/kube_cluster.py picks the controllers (more of them with a real node: REAL_NODE_CONTROLLERS).
build kube-controller-manager "$K8S_VERSION" "$k8s_dir" k8s.io/kubernetes/cmd/kube-controller-manager "$k8s_ldflags"
build kube-scheduler "$K8S_VERSION" "$k8s_dir" k8s.io/kubernetes/cmd/kube-scheduler "$k8s_ldflags"
if [ "$with_kubectl" = 1 ]; then
  build kubectl "$K8S_VERSION" "$k8s_dir" k8s.io/kubernetes/cmd/kubectl "$k8s_ldflags"
fi

# --- the real node (tests/real_node.py): kubelet and kube-proxy from the same module and build cache;
# the pod sandbox binary from Kubernetes' own build/pause/linux/pause.c (shipped in the module zip: the
# pause image cannot be pulled here), static so a one-file image runs it; the container runtime and the
# CNI plugins from Debian (installed only when missing).
node_packages=(containerd runc containernetworking-plugins nftables busybox-static)
if [ "$with_node" = 1 ]; then
  build kubelet "$K8S_VERSION" "$k8s_dir" k8s.io/kubernetes/cmd/kubelet "$k8s_ldflags"
  build kube-proxy "$K8S_VERSION" "$k8s_dir" k8s.io/kubernetes/cmd/kube-proxy "$k8s_ldflags"
  pause=$bin/pause-$K8S_VERSION
  if [ ! -x "$pause" ]; then
    command -v gcc >/dev/null || { log "gcc is needed to build the pause binary"; exit 1; }
    (cd "$cache/go/src" && go mod download k8s.io/kubernetes@"$K8S_VERSION")  # the extracted module
    gcc -Os -static -o "$pause.tmp" "$GOMODCACHE/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c"
    mv -f "$pause.tmp" "$pause"
    log "built pause $K8S_VERSION"
  fi
  ln -sfn "pause-$K8S_VERSION" "$bin/pause"
  missing=()
  for package in "${node_packages[@]}"; do
    dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
      log "apt-get install ${missing[*]} ..."
      apt_install=(env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq
                   --no-install-recommends "${missing[@]}")
      "${apt_install[@]}" >&2 || { apt-get update -qq >&2 && "${apt_install[@]}" >&2; } \
        || log "apt-get install ${missing[*]} failed: the real test node will not start"
    else  # tests/real_node.py's preflight then names what is missing
      log "the real test node needs the Debian packages ${missing[*]} (install them as root)"
    fi
  fi
fi

# --- etcd: the server version kubernetes itself is built and tested against (Debian bookworm's
# etcd-server is 3.4, far older than the 3.7 client used by kube-apiserver 1.37).
if [ -z "$ETCD_VERSION" ]; then
  ETCD_VERSION=$(sed -n 's|^\s*go\.etcd\.io/etcd/client/v3 \(v[^ ]*\).*|\1|p' "$k8s_mod" | head -1)
fi
if [ -n "${ETCD_BIN:-}" ]; then  # use an existing etcd instead, e.g. ETCD_BIN=/usr/bin/etcd
  [ -x "$ETCD_BIN" ] || { log "ETCD_BIN=$ETCD_BIN is not executable"; exit 1; }
  ETCD_VERSION=$("$ETCD_BIN" --version | sed -n 's/^etcd Version: /v/p')
  log "using etcd $ETCD_VERSION from $ETCD_BIN"
  ln -sfn "$(readlink -f "$ETCD_BIN")" "$bin/etcd"
else
  etcd_dir=$cache/go/src/etcd-$ETCD_VERSION
  make_module "$etcd_dir" go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
  build etcd "$ETCD_VERSION" "$etcd_dir" go.etcd.io/etcd/server/v3 ""
fi

# --- helm
helm_dir=$cache/go/src/helm-$HELM_VERSION
make_module "$helm_dir" helm.sh/helm/v3 "$HELM_VERSION"
# As helm's Makefile does: the Kubernetes version `helm template`/`lint` assume without a cluster
# (.Capabilities.KubeVersion, checked against Chart.yaml's kubeVersion) is that of its client-go
# (v0.37.x -> 1.37); unset, it would be v1.20. The version is part of the cache key, so a change rebuilds.
helm_client_go=$(sed -n 's|^\s*k8s\.io/client-go v0\.\([0-9]*\)\..*|\1|p' "$(go_module_file helm.sh/helm/v3 "$HELM_VERSION")")
[ -n "$helm_client_go" ] || { log "no k8s.io/client-go version found in helm $HELM_VERSION's go.mod"; exit 1; }
helm_ldflags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
helm_ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  helm_ldflags+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$helm_client_go"
done
build helm "$HELM_VERSION-k8s1.$helm_client_go" "$helm_dir" helm.sh/helm/v3/cmd/helm "$helm_ldflags"

# --- the Gateway API Inference Extension's InferencePool CRD (tests/test_inference_pool.py), from its Go module
# (sigs.k8s.io/gateway-api-inference-extension, config/crd/bases), copied to $cache/crds/ by version.
gie_crd=$cache/crds/gie-$GIE_VERSION/inference.networking.k8s.io_inferencepools.yaml
if [ ! -f "$gie_crd" ]; then
  gie_dir=$( (cd "$cache/go/src" && go mod download -json "sigs.k8s.io/gateway-api-inference-extension@$GIE_VERSION") \
    | sed -n 's/^\s*"Dir": "\(.*\)",\?$/\1/p')
  [ -f "$gie_dir/config/crd/bases/$(basename "$gie_crd")" ] || { log "no InferencePool CRD in GIE $GIE_VERSION"; exit 1; }
  mkdir -p "$(dirname "$gie_crd")"
  cp "$gie_dir/config/crd/bases/$(basename "$gie_crd")" "$gie_crd.tmp" && mv -f "$gie_crd.tmp" "$gie_crd"
  log "InferencePool CRD of GIE $GIE_VERSION copied to $gie_crd"
fi

if [ "$selftest" = 1 ]; then
  log "selftest: starting etcd $ETCD_VERSION and kube-apiserver $K8S_VERSION on loopback ..."
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/lmkube-selftest.XXXXXX")
  pids=()
  cleanup() {  # stop kube-apiserver before etcd (it hangs retrying etcd otherwise), newest first
    local i pid t
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
      pid=${pids[i]}
      kill "$pid" 2>/dev/null || true
      for ((t = 0; t < 100; t++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
  }
  trap cleanup EXIT
  free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
  etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)
  while [ "$peer_port" = "$etcd_port" ]; do peer_port=$(free_port); done
  while [ "$api_port" = "$etcd_port" ] || [ "$api_port" = "$peer_port" ]; do api_port=$(free_port); done

  start=$SECONDS
  "$bin/etcd" --name selftest --data-dir "$tmp/etcd" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "selftest=http://127.0.0.1:$peer_port" >"$tmp/etcd.log" 2>&1 &
  pids+=($!)
  until curl -fsS "http://127.0.0.1:$etcd_port/health" 2>/dev/null | grep -q '"health":"true"'; do
    if ! kill -0 "${pids[0]}" 2>/dev/null || [ $((SECONDS - start)) -gt 60 ]; then
      tail -n 30 "$tmp/etcd.log" >&2; log "selftest FAILED: etcd did not become healthy"; exit 1
    fi
    sleep 0.2
  done
  log "etcd healthy on 127.0.0.1:$etcd_port after $((SECONDS - start))s"

  openssl genrsa -out "$tmp/sa.key" 2048 2>/dev/null
  openssl rsa -in "$tmp/sa.key" -pubout -out "$tmp/sa.pub" 2>/dev/null
  token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
  echo "$token,lmkube-admin,lmkube-admin,\"system:masters\"" >"$tmp/tokens.csv"

  start=$SECONDS
  "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" --cert-dir "$tmp/certs" \
    --token-auth-file "$tmp/tokens.csv" --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$tmp/sa.pub" --service-account-signing-key-file "$tmp/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 --allow-privileged=true --endpoint-reconciler-type none >"$tmp/apiserver.log" 2>&1 &
  pids+=($!)
  server=https://127.0.0.1:$api_port
  until [ "$(curl -ksS -H "Authorization: Bearer $token" "$server/readyz" 2>/dev/null)" = ok ]; do
    if ! kill -0 "${pids[1]}" 2>/dev/null || [ $((SECONDS - start)) -gt 120 ]; then
      tail -n 40 "$tmp/apiserver.log" >&2; log "selftest FAILED: kube-apiserver not ready"; exit 1
    fi
    sleep 0.5
  done
  log "kube-apiserver ready on $server after $((SECONDS - start))s"

  # Anonymous requests must not be authorised to list namespaces (RBAC is really on).
  code=$(curl -ks -o /dev/null -w '%{http_code}' "$server/api/v1/namespaces")
  [ "$code" = 401 ] || [ "$code" = 403 ] || { log "selftest FAILED: anonymous list got HTTP $code"; exit 1; }
  curl -kfsS -H "Authorization: Bearer $token" "$server/version" >&2; echo >&2
  if [ -x "$bin/kubectl" ] && [ "$with_kubectl" = 1 ]; then
    "$bin/kubectl" --server "$server" --token "$token" --insecure-skip-tls-verify get ns >&2
  fi
  "$bin/helm" version >&2
  "$bin/helm" --kube-apiserver "$server" --kube-token "$token" --kube-insecure-skip-tls-verify list -A >&2
  log "selftest passed (stopping etcd and kube-apiserver)"
fi

echo "LMKUBE_ETCD=$bin/etcd"
echo "LMKUBE_KUBE_APISERVER=$bin/kube-apiserver"
echo "LMKUBE_KUBE_CONTROLLER_MANAGER=$bin/kube-controller-manager"
echo "LMKUBE_KUBE_SCHEDULER=$bin/kube-scheduler"
if [ "$with_node" = 1 ]; then
  echo "LMKUBE_KUBELET=$bin/kubelet"
  echo "LMKUBE_KUBE_PROXY=$bin/kube-proxy"
  echo "LMKUBE_PAUSE=$bin/pause"
  echo "LMKUBE_BUSYBOX=$(command -v busybox || echo /bin/busybox)"
fi
[ "$with_kubectl" = 1 ] && echo "LMKUBE_KUBECTL=$bin/kubectl"
echo "LMKUBE_HELM=$bin/helm"
echo "KUBEBUILDER_ASSETS=$bin"
echo "LMKUBE_GIE_CRD=$gie_crd"
