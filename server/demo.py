"""The offline demo model: a tiny random-weight GGUF, so every endpoint works with no download.

It produces gibberish by construction; see the README for getting a real model.
"""

from __future__ import annotations

from pathlib import Path

from lmkube.synthetic_gguf import LlamaShape, write_llama_model

DEMO_MODEL_KEY = "lmkube/demo"
DEMO_FILE = Path("lmkube") / "demo" / "lmkube-demo-F16.gguf"
DEMO_SHAPE = LlamaShape(n_vocab=2048, n_embd=128, n_layer=4, n_head=4, n_head_kv=2, n_ff=384, n_ctx_train=4096)


def ensure_demo_model(models_dir: Path) -> Path:
    """Writes the demo model into the store once; later starts reuse it."""
    path = models_dir / DEMO_FILE
    if not path.exists():
        write_llama_model(path, DEMO_SHAPE, dtype="f16", name="lmkube demo (random weights)", seed=1234,
                          emit_eos=True, eos_gain=2.0)
    return path
