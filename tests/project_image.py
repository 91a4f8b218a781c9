"""The project's own server image (scripts/build-image.sh, buildah; cached, so a rebuild only happens when the
sources change) and its transfer into the real test node's containerd (tests/real_node.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 2400  # a cold build on 2 cores: debootstrap + compiling llama.cpp + dependencies


@dataclass(frozen=True)
class Buildah:
    """buildah pointed at the storage scripts/build-image.sh built into."""

    root: str
    runroot: str
    driver: str

    def argv(self, *args: str) -> list[str]:
        return ["buildah", "--root", self.root, "--runroot", self.runroot, "--storage-driver", self.driver, *args]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=600)
        if check and proc.returncode != 0:
            raise AssertionError(f"buildah {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc


def build_image() -> tuple[str, Buildah]:
    """Runs scripts/build-image.sh (CPU) and returns the image name and the buildah that holds it. Fails with
    what to do when buildah or root is missing."""
    if shutil.which("buildah") is None:
        raise AssertionError("buildah is not installed: run scripts/install-image-tools.sh (make test does)")
    if os.geteuid() != 0:
        raise AssertionError("building the image needs root (buildah --isolation chroot with vfs storage)")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "build-image.sh")], capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT, cwd=ROOT)
    assert proc.returncode == 0, f"scripts/build-image.sh failed:\n{proc.stderr[-8000:]}"
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    buildah = Buildah(values["LMKUBE_BUILDAH_ROOT"], values["LMKUBE_BUILDAH_RUNROOT"],
                      values["LMKUBE_BUILDAH_STORAGE_DRIVER"])
    return values["LMKUBE_IMAGE"], buildah


def export_oci_archive(name: str, buildah: Buildah, path: Path) -> Path:
    """Writes image `name` as an OCI archive that `ctr images import` loads under the same name."""
    buildah("push", "--quiet", name, f"oci-archive:{path}:{name}")
    return path
