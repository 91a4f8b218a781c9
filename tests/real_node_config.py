"""Configuration files of the real test node (tests/real_node.py): containerd, the CNI network, kubelet.

Every path, socket and port is the node's own (under its working directory), except the few that the
programs hard-code; tests/real_node.py masks those with tmpfs mounts inside the node's mount namespace.
The reasons for each setting are in /work/shared/reference/real-node-notes.md ("What failed").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

BRIDGE = "lmkube0"
NODE_IP = "10.244.0.1"
POD_SUBNET = "10.244.0.0/24"
CGROUP_ROOT = "lmkube-test"
PAUSE_IMAGE = "localhost/lmkube-test/pause:v1"
# Plugins that would touch paths outside the node's directories (the `opt` plugin creates /opt/containerd)
# or that this host cannot use.
DISABLED_CONTAINERD_PLUGINS = (
    "io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
)


@dataclass
class NodePaths:
    """Where one node keeps its state (all under `root`)."""

    root: Path

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def containerd_config(self) -> Path:
        return self.root / "containerd.toml"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def kubelet_config(self) -> Path:
        return self.root / "kubelet.yaml"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def sysctl_dir(self) -> Path:
        return self.root / "sysctl"


def containerd_toml(paths: NodePaths, runc: str) -> str:
    state = paths.root / "containerd"
    disabled = ", ".join(json.dumps(name) for name in DISABLED_CONTAINERD_PLUGINS)
    return f"""version = 2
root = "{state}/root"
state = "{state}/state"
disabled_plugins = [{disabled}]

[grpc]
  address = "{paths.containerd_socket}"

[ttrpc]
  address = "{state}/containerd.sock.ttrpc"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # Root lacks CAP_SYS_RESOURCE here: runc cannot give the pause container a negative oom_score_adj.
  restrict_oom_score_adj = true
  # Pod network namespaces are pinned under the state directory, inside the node's mount namespace.
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        Root = "{paths.root}/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{paths.cni_conf_dir}"
"""


def cni_conflist(paths: NodePaths) -> dict[str, object]:
    """The pod network: veths on the pre-created bridge. `isGateway: false` and `ipMasq: false` keep the
    host's ip_forward and NAT rules untouched; the default route via the bridge address lets pods reach
    ClusterIPs (kube-proxy's nft rules on the node)."""
    return {
        "cniVersion": "1.0.0", "name": "lmkube-test",
        "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": False, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": str(paths.root / "cni" / "ipam"),
                      "ranges": [[{"subnet": POD_SUBNET, "rangeStart": "10.244.0.10", "gateway": NODE_IP}]],
                      "routes": [{"dst": "0.0.0.0/0", "gw": NODE_IP}]}},
        ],
    }


def kubelet_configuration(paths: NodePaths, port: int, healthz_port: int, client_ca: Path | None = None) -> str:
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{paths.containerd_socket}",
        "address": NODE_IP, "port": port, "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": healthz_port,
        # The apiserver reaches the kubelet (logs, exec) without a client certificate in the test cluster.
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        # This host has cgroup v1 (hybrid) and no systemd; kubelet 1.37 refuses v1 unless told.
        "failCgroupV1": False, "cgroupDriver": "cgroupfs", "cgroupRoot": f"/{CGROUP_ROOT}",
        "failSwapOn": False,
        "volumePluginDir": str(paths.root / "volume-plugins"),
        "resolvConf": "/etc/resolv.conf",
        # A shared, busy machine: never garbage-collect the locally imported images (they cannot be pulled
        # back) and never evict pods for host pressure the tests did not cause.
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "serializeImagePulls": False,
        # Quicker reactions than the defaults, so state changes show within seconds.
        "nodeStatusUpdateFrequency": "4s", "syncFrequency": "10s", "fileCheckFrequency": "5s",
        "shutdownGracePeriod": "0s",
    }
    if client_ca is not None:
        config["authentication"]["x509"] = {"clientCAFile": str(client_ca)}  # type: ignore[index]
    return yaml.safe_dump(config)


def kube_proxy_configuration(kubeconfig: Path, node_name: str, metrics_port: int, healthz_port: int) -> str:
    """nftables mode (its rules stay in its own `kube-proxy` tables); conntrack settings 0 so it writes no
    sysctls; NodePorts only on the bridge address."""
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "nftables", "hostnameOverride": node_name, "clusterCIDR": POD_SUBNET,
        "nodePortAddresses": [f"{NODE_IP}/32"],
        "bindAddress": NODE_IP,
        "metricsBindAddress": f"127.0.0.1:{metrics_port}", "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s",
                      "udpTimeout": "0s", "udpStreamTimeout": "0s"},
        # Service traffic from a pod to a pod on the same bridge must return through the node (to be
        # un-NATed): masquerading it to the node address makes it so, whatever the host's br_netfilter says.
        "nftables": {"masqueradeAll": True},
    }
    return yaml.safe_dump(config)
