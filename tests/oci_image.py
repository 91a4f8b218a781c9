"""Tiny OCI image archives written from local files, for the real test node (tests/real_node.py).

The pod sandbox ("pause") image cannot be pulled here, and the failure-mode tests want a small image with a
shell; both are one layer of a few local files. `write_oci_archive` writes an OCI image layout as a tar that
`ctr -n k8s.io images import` loads under the name given (the `io.containerd.image.name` annotation), so
pods can use it with `imagePullPolicy: Never`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ImageFile:
    """One entry of the layer: a copy of local file `source`, `data`, or a symlink when `link_to` is set."""

    path: str
    source: Path | None = None
    data: bytes | None = None
    link_to: str | None = None
    mode: int = 0o755


@dataclass
class ImageSpec:
    name: str
    files: list[ImageFile]
    entrypoint: list[str]
    cmd: list[str] = field(default_factory=list)
    user: str = ""


def _layer(files: list[ImageFile]) -> bytes:
    """A deterministic gzip'd tar of `files` (fixed mtimes, root-owned), parents created as directories."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directories: set[str] = set()
        for entry in files:
            parts = entry.path.strip("/").split("/")
            for depth in range(1, len(parts)):
                directory = "/".join(parts[:depth])
                if directory not in directories:
                    directories.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            info = tarfile.TarInfo(entry.path.strip("/"))
            info.mode = entry.mode
            if entry.link_to is not None:
                info.type, info.linkname = tarfile.SYMTYPE, entry.link_to
                tar.addfile(info)
            else:
                data = entry.data if entry.source is None else entry.source.read_bytes()
                assert data is not None, entry
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue(), mtime=0)


def _blob(tar: tarfile.TarFile, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
    return f"sha256:{digest}"


def write_oci_archive(spec: ImageSpec, path: Path) -> Path:
    """Writes `spec` as an OCI image layout tar at `path` (linux/amd64) and returns `path`."""
    layer = _layer(spec.files)
    config = {
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": spec.entrypoint, "Cmd": spec.cmd or None, "User": spec.user,
                   "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(gzip.decompress(layer)).hexdigest()}"]},
    }
    with tarfile.open(path, mode="w") as tar:
        config_bytes = json.dumps(config).encode()
        manifest = {
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": _blob(tar, config_bytes), "size": len(config_bytes)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": _blob(tar, layer), "size": len(layer)}],
        }
        manifest_bytes = json.dumps(manifest).encode()
        index = {
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "digest": _blob(tar, manifest_bytes), "size": len(manifest_bytes),
                           "platform": {"architecture": "amd64", "os": "linux"},
                           "annotations": {"io.containerd.image.name": spec.name,
                                           "org.opencontainers.image.ref.name": spec.name.rsplit(":", 1)[-1]}}],
        }
        layout = b'{"imageLayoutVersion": "1.0.0"}'
        for name, data in (("oci-layout", layout), ("index.json", json.dumps(index).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
