"""A tiny random-weight vision projector ("mmproj", LLaVA-1.5 style `mlp`) that llama.cpp's libmtmd loads.

Written next to a `write_llama_model` file it makes that model a vision model for the offline demo, the
tests and the benchmarks. What libmtmd requires of the file (keys, UINT32 integers, tensors whose absence
crashes the warm-up) is in the reference notes; every key and tensor below is one of those.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .synthetic_gguf import _fill, _rand, _Tensor, _write_atomically

__all__ = ["VisionShape", "write_mmproj"]


@dataclass(frozen=True)
class VisionShape:
    image_size: int = 32  # every input image is resized to image_size × image_size
    patch_size: int = 8  # (image_size / patch_size)² image tokens per image: 16 here
    n_embd: int = 32  # vision width
    n_ff: int = 64  # keep ≠ n_embd (libmtmd's swapped-FFN heuristic)
    n_layer: int = 2
    n_head: int = 2
    projector_hidden: int = 64

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def write_mmproj(path: Path, text_n_embd: int = 64, shape: VisionShape = VisionShape(), *, seed: int = 0) -> Path:
    """Writes the projector for a text model of width `text_n_embd` (the projector's output must match)."""
    rng = np.random.default_rng(seed)
    e, f, h = shape.n_embd, shape.n_ff, shape.projector_hidden
    n_patches = shape.image_tokens
    f32 = np.float32

    def add_kv(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MMPROJ)
        w.add_name("tiny-vision-projector")
        w.add_bool("clip.has_vision_encoder", True)
        w.add_string("clip.projector_type", "mlp")
        w.add_bool("clip.use_gelu", True)
        for key, value in (("image_size", shape.image_size), ("patch_size", shape.patch_size),
                           ("embedding_length", e), ("feed_forward_length", f), ("block_count", shape.n_layer),
                           ("attention.head_count", shape.n_head), ("projection_dim", text_n_embd)):
            w.add_uint32(f"clip.vision.{key}", value)  # INT32 here aborts libmtmd (a type assert)
        w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
        w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
        w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    # numpy order: the reverse of ggml's shapes in the notes.
    tensors: list[_Tensor] = [
        _rand(rng, "v.patch_embd.weight", (e, 3, shape.patch_size, shape.patch_size), 0.1, f32),
        _rand(rng, "v.position_embd.weight", (n_patches, e), 0.1, f32),
    ]
    for i in range(shape.n_layer):
        block = f"v.blk.{i}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensors.append(_rand(rng, f"{block}.{name}.weight", (e, e), 0.1, f32))
            tensors.append(_fill(f"{block}.{name}.bias", (e,), 0.0))
        for norm in ("ln1", "ln2"):
            tensors.append(_fill(f"{block}.{norm}.weight", (e,), 1.0))
            tensors.append(_fill(f"{block}.{norm}.bias", (e,), 0.0))
        tensors.append(_rand(rng, f"{block}.ffn_up.weight", (f, e), 0.1, f32))
        tensors.append(_fill(f"{block}.ffn_up.bias", (f,), 0.0))
        tensors.append(_rand(rng, f"{block}.ffn_down.weight", (e, f), 0.1, f32))
        tensors.append(_fill(f"{block}.ffn_down.bias", (e,), 0.0))
    tensors += [
        _rand(rng, "mm.0.weight", (h, e), 0.1, f32),
        _fill("mm.0.bias", (h,), 0.0),  # a missing bias crashes libmtmd
        _rand(rng, "mm.2.weight", (text_n_embd, h), 0.1, f32),
        _fill("mm.2.bias", (text_n_embd,), 0.0),
    ]
    return _write_atomically(path, "clip", add_kv, tensors)
