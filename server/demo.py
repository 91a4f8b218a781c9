"""The offline demo models: a small real instruct model, and a tiny random-weight GGUF for speed checks.

`lmkube serve --demo` puts both in the store. The real one (SmolLM2-135M-Instruct, lmkube.real_model) is
linked from where set-up cached it, so it answers in English with no download; the random one
(`lmkube/demo`) is written here and produces gibberish by construction, but loads in milliseconds. So is
`lmkube/demo-vision`: the same kind of model with a random vision projector, so that images can be sent to
every endpoint offline (the answers are gibberish too, but they depend on the image).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

from lmkube.real_model import REAL_MODEL_FILE, real_model_path
from lmkube.synthetic_gguf import LlamaShape, write_llama_model
from lmkube.synthetic_mmproj import VisionShape, write_mmproj

log = logging.getLogger(__name__)

DEMO_MODEL_KEY = "lmkube/demo"
DEMO_FILE = Path("lmkube") / "demo" / "lmkube-demo-F16.gguf"
DEMO_SHAPE = LlamaShape(n_vocab=2048, n_embd=128, n_layer=4, n_head=4, n_head_kv=2, n_ff=384, n_ctx_train=4096)


def ensure_demo_model(models_dir: Path) -> Path:
    """Writes the random-weight demo model into the store once; later starts reuse it."""
    path = models_dir / DEMO_FILE
    if not path.exists():
        write_llama_model(path, DEMO_SHAPE, dtype="f16", name="lmkube demo (random weights)", seed=1234,
                          emit_eos=True, eos_gain=2.0)
    return path


DEMO_VISION_KEY = "lmkube/demo-vision"
DEMO_VISION_FOLDER = Path("lmkube") / "demo-vision"
DEMO_VISION_SHAPE = VisionShape(image_size=64, patch_size=8, n_embd=64, n_ff=128, n_layer=2, n_head=4,
                                projector_hidden=128)  # 64 image tokens an image


def ensure_demo_vision_model(models_dir: Path) -> Path:
    """Writes the random-weight vision demo model and its projector once (the projector last: the store sees
    a vision model only once both are there)."""
    folder = models_dir / DEMO_VISION_FOLDER
    path = folder / "lmkube-demo-vision-F16.gguf"
    projector = folder / "mmproj-lmkube-demo-vision-F32.gguf"
    if not path.exists():
        write_llama_model(path, DEMO_SHAPE, dtype="f16", name="lmkube demo vision (random weights)", seed=4321,
                          emit_eos=True, eos_gain=2.0)
    if not projector.exists():
        write_mmproj(projector, text_n_embd=DEMO_SHAPE.n_embd, shape=DEMO_VISION_SHAPE, seed=4321)
    return path


def link_real_model(models_dir: Path, source: Path | None = None) -> Path:
    """Puts the real instruct model (`source`, default: lmkube.real_model's copy) into the store.

    A symlink, so the store costs no second copy; a copy where the file system has no symlinks. A file
    already there is kept (the user's own copy); a link whose target vanished (a cleared cache) is redone.
    Raises lmkube.real_model.RealModelUnavailable when there is no copy and fetching one fails.
    """
    path = models_dir / REAL_MODEL_FILE
    if path.is_file():
        return path
    source = source or real_model_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden (the store skips it) and unique: two download requests may link it at once.
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        os.symlink(source, partial)
    except OSError as exc:
        log.info("cannot symlink %s (%s); copying it", source, exc)
        shutil.copyfile(source, partial)
    os.replace(partial, path)  # also replaces a dangling link atomically
    return path
