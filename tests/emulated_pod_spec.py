"""What a Pod's spec means for its containers' processes on this host: volumes as host directories, mount
paths mapped into argv and env, env from values, Secrets, ConfigMaps and fieldRefs, the ServiceAccount
token volume as a kubeconfig, and the command line. A mixin of `PodRuntime` (tests/emulated_pod.py), which
holds the pod, its IP, the emulator's settings and the `lookup` for API objects; it only reads them.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from emulated_pod import Settings

# lookup(kind, namespace, name) -> the object's data ({key: str value}) or None when it does not exist.
Lookup = Callable[[str, str, str], "dict[str, str] | None"]
# service_account(namespace, name, path) -> writes a kubeconfig holding a TokenRequest token of that
# ServiceAccount at `path` and returns it; None when the account does not exist.
ServiceAccountConfig = Callable[[str, str, Path], "Path | None"]

# Where the ServiceAccount admission plugin mounts the projected token volume (kube-api-access-*).
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


class ConfigError(Exception):
    """The kubelet's CreateContainerConfigError: a referenced Secret/ConfigMap (key) is missing."""


class PodSpecMixin:
    pod: dict[str, Any]
    namespace: str
    name: str
    uid: str
    ip: str
    host_ip: str
    settings: Settings
    lookup: Lookup
    service_account: ServiceAccountConfig | None
    home: Path

    @property
    def restart_policy(self) -> str:
        return self.pod["spec"].get("restartPolicy", "Always")

    def volume_dir(self, volume: dict[str, Any]) -> Path:
        base = self.settings.root / "volumes" / self.namespace
        if "persistentVolumeClaim" in volume:
            return base / volume["persistentVolumeClaim"]["claimName"]
        if "hostPath" in volume:
            return Path(volume["hostPath"]["path"])
        return base / f"{self.name}-{volume['name']}"

    def _prepare_volumes(self) -> dict[str, Path]:
        """Host directory of every volume; Secret/ConfigMap volumes get their keys written as files."""
        dirs = {}
        for volume in self.pod["spec"].get("volumes") or []:
            path = self.volume_dir(volume)
            path.mkdir(parents=True, exist_ok=True)
            for kind in ("secret", "configMap"):
                source = volume.get(kind)
                if source is None:
                    continue
                name = source.get("secretName") or source.get("name")
                data = self.lookup(kind, self.namespace, name)
                if data is None and not source.get("optional"):
                    raise ConfigError(f'{"secret" if kind == "secret" else "configmap"} "{name}" not found')
                for key, value in (data or {}).items():
                    (path / key).write_text(value)
            dirs[volume["name"]] = path
        return dirs

    def _mounts(self, container: dict[str, Any], dirs: Mapping[str, Path]) -> list[tuple[str, str]]:
        """(mountPath, host path) pairs, longest mountPath first so nested mounts win."""
        pairs = []
        for mount in container.get("volumeMounts") or []:
            if mount["name"] in dirs:
                host = dirs[mount["name"]] / mount.get("subPath", "")
                host.mkdir(parents=True, exist_ok=True)
                pairs.append((mount["mountPath"].rstrip("/") or "/", str(host)))
        return sorted(pairs, key=lambda pair: len(pair[0]), reverse=True)

    @staticmethod
    def _map_path(value: str, mounts: list[tuple[str, str]]) -> str:
        """`value` with a leading container mount path replaced by its host directory (also after `--x=`)."""
        prefix = ""
        if value.startswith("-") and "=" in value:
            prefix, _, value = value.partition("=")
            prefix += "="
        for mount_path, host in mounts:
            if value == mount_path or value.startswith(mount_path + "/"):
                return prefix + host + value[len(mount_path):]
        return prefix + value

    def _field(self, path: str) -> str:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        simple = {
            "metadata.name": self.name, "metadata.namespace": self.namespace, "metadata.uid": self.uid,
            "status.podIP": self.ip, "status.hostIP": self.host_ip, "spec.nodeName": spec.get("nodeName", ""),
            "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        }
        if path in simple:
            return simple[path]
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if match:
            return (meta.get(match[1]) or {}).get(match[2], "")
        raise ConfigError(f"unsupported fieldRef {path!r}")

    def _key_ref(self, kind: str, ref: dict[str, Any]) -> str | None:
        data = self.lookup(kind, self.namespace, ref["name"])
        label = "secret" if kind == "secret" else "configmap"
        if data is None:
            if ref.get("optional"):
                return None
            raise ConfigError(f'{label} "{ref["name"]}" not found')
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            kind_name = "Secret" if kind == "secret" else "ConfigMap"
            raise ConfigError(f"couldn't find key {ref['key']} in {kind_name} {self.namespace}/{ref['name']}")
        return data[ref["key"]]

    def _env(self, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            kind = "secret" if "secretRef" in source else "configMap"
            ref = source.get("secretRef") or source.get("configMapRef") or {}
            data = self.lookup(kind, self.namespace, ref["name"])
            if data is None and not ref.get("optional"):
                raise ConfigError(f'{"secret" if kind == "secret" else "configmap"} "{ref["name"]}" not found')
            env.update({source.get("prefix", "") + k: v for k, v in (data or {}).items()})
        for var in container.get("env") or []:
            if "valueFrom" not in var:
                env[var["name"]] = _expand(var.get("value", ""), env)
                continue
            source = var["valueFrom"]
            value: str | None
            if "secretKeyRef" in source:
                value = self._key_ref("secret", source["secretKeyRef"])
            elif "configMapKeyRef" in source:
                value = self._key_ref("configMap", source["configMapKeyRef"])
            elif "fieldRef" in source:
                value = self._field(source["fieldRef"]["fieldPath"])
            else:  # resourceFieldRef: what a container would see without limits
                value = "0"
            if value is not None:
                env[var["name"]] = value
        return env

    def _token_volume(self, container: dict[str, Any]) -> dict[str, Any] | None:
        """The projected ServiceAccount token volume the container mounts (automountServiceAccountToken), if any."""
        mounted = {m["name"] for m in container.get("volumeMounts") or []
                   if m["mountPath"].rstrip("/") == SERVICE_ACCOUNT_MOUNT}
        for volume in self.pod["spec"].get("volumes") or []:
            sources = (volume.get("projected") or {}).get("sources") or []
            if volume["name"] in mounted and any("serviceAccountToken" in source for source in sources):
                return volume
        return None

    def _service_account_env(self, container: dict[str, Any]) -> dict[str, str]:
        """KUBECONFIG for a container with an automounted ServiceAccount token.

        In a real pod, client libraries log in with the mounted token and KUBERNETES_SERVICE_HOST; here
        the apiserver is on loopback and the mount path cannot be mapped for them, so the container gets a
        kubeconfig with a TokenRequest token of its serviceAccountName instead (kopf and kubectl read
        KUBECONFIG when KUBERNETES_SERVICE_HOST is unset). The token and namespace files are written into
        the volume as well, as the kubelet would.
        """
        volume = self._token_volume(container)
        if volume is None or self.service_account is None:
            return {}
        account = self.pod["spec"].get("serviceAccountName") or "default"
        directory = self.volume_dir(volume)
        kubeconfig = self.service_account(self.namespace, account, directory / "kubeconfig")
        if kubeconfig is None:
            raise ConfigError(f'serviceaccount "{account}" not found')
        config = yaml.safe_load(kubeconfig.read_text())
        (directory / "token").write_text(config["users"][0]["user"]["token"])
        (directory / "namespace").write_text(self.namespace)
        return {"KUBECONFIG": str(kubeconfig)}

    def _command(self, container: dict[str, Any], mounts: list[tuple[str, str]]) -> tuple[list[str], dict[str, str]]:
        """argv and environment of the container's process on this host."""
        env = {name: self._map_path(value, mounts) for name, value in self._env(container).items()}
        env = self._service_account_env(container) | env
        command = list(container.get("command") or self.settings.image_entrypoints.get(container.get("image", ""))
                       or ["lmkube"])
        argv = [_expand(a, env) for a in command + list(container.get("args") or [])]
        argv = [self._map_path(a, mounts) for a in argv]
        for i, arg in enumerate(argv):  # the server binds the pod's own IP, not every host address
            if arg in ("--host", "--bind", "--address") and i + 1 < len(argv) and argv[i + 1] in ("0.0.0.0", "::"):
                argv[i + 1] = self.ip
            elif arg in ("--host=0.0.0.0", "--bind=0.0.0.0"):
                argv[i] = arg.split("=")[0] + "=" + self.ip
            elif "://0.0.0.0:" in arg:  # a listen URL, e.g. kopf's --liveness=http://0.0.0.0:8080/healthz
                argv[i] = arg.replace("://0.0.0.0:", f"://{self.ip}:")
        executable = Path(argv[0]).name if argv[0].startswith("/") and not Path(argv[0]).exists() else argv[0]
        if "/" not in executable:
            local = self.settings.python_bin_dir / executable
            executable = str(local) if local.exists() else (shutil.which(executable) or executable)
        argv[0] = executable
        base = {"PATH": f"{self.settings.python_bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(self.home),
                "HOSTNAME": self.name, "LANG": "C.UTF-8", **self.settings.extra_env}
        return argv, {**base, **env}


def _expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's $(VAR) expansion ($$ escapes; unknown variables stay as written)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m[0] == "$$" else env.get(m[1], m[0]), text)
