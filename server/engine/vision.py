"""A model's vision projector through llama.cpp's multimodal library (libmtmd): images into prompt chunks,
and an image chunk evaluated into one sequence of the generation engine's context.

A prompt with images is a token list in which each image stands as a run of placeholder ids, one per image
token (so positions, the context check and usage all count image tokens). The placeholder is negative (no
real token is) and derived from the image's pixels: the prompt cache compares token lists, so a later turn
that sends the same image at the same place reuses its KV instead of encoding it again.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import gguf
import llama_cpp as C
import numpy as np
import numpy.typing as npt
from llama_cpp import mtmd_cpp as M

from . import llama_lib as lib

log = logging.getLogger(__name__)

# Keys libmtmd needs before it will load a projector: a file without them can crash the process inside
# `mtmd_init_from_file` (warm-up), so they are checked here first and a bad file is an error message.
_REQUIRED_KEYS = ("clip.has_vision_encoder", "clip.projector_type", "clip.vision.image_size",
                  "clip.vision.patch_size", "clip.vision.embedding_length", "clip.vision.block_count")
_REQUIRED_TENSORS = ("v.patch_embd.weight",)


class ProjectorError(lib.ModelLoadError):
    pass


class ImageTokenizeError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Image:
    """Decoded RGB pixels, row-major, 3 bytes a pixel."""

    width: int
    height: int
    rgb: bytes

    @property
    def placeholder(self) -> int:
        digest = hashlib.blake2b(self.rgb, digest_size=8, person=b"lmkube-img")
        digest.update(f"{self.width}x{self.height}".encode())
        return -1 - (int.from_bytes(digest.digest(), "little") >> 34)  # 30 bits: always a negative int


class PromptImages:
    """The image chunks of one tokenized prompt, keyed by where each image starts in the token list."""

    def __init__(self, chunks: ctypes.c_void_p, spans: dict[int, tuple[int, ctypes.c_void_p]]) -> None:
        self._chunks = chunks  # owns every chunk below
        self.spans = spans  # start → (image tokens, chunk)
        self.image_tokens = sum(n for n, _ in spans.values())

    def at(self, pos: int) -> tuple[int, int, ctypes.c_void_p] | None:
        """The image covering prompt position `pos`: (its start, its tokens, its chunk), or None."""
        for start, (n, chunk) in self.spans.items():
            if start <= pos < start + n:
                return start, n, chunk
        return None

    def next_start(self, pos: int) -> int | None:
        """The first image start at or after `pos`."""
        return min((s for s in self.spans if s >= pos), default=None)

    def __del__(self) -> None:
        if self._chunks:
            M.mtmd_input_chunks_free(self._chunks)
            self._chunks = None  # type: ignore[assignment]


def _check_projector(path: Path) -> int:
    """Returns the projector's image size."""
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError, struct.error, … for a truncated or foreign file
        raise ProjectorError(f"vision projector {path.name} is not a readable GGUF: {exc}") from None
    missing = [k for k in _REQUIRED_KEYS if k not in reader.fields]
    missing += [t for t in _REQUIRED_TENSORS if t not in {tensor.name for tensor in reader.tensors}]
    if missing:
        raise ProjectorError(f"vision projector {path.name} lacks {', '.join(missing)}")
    return int(reader.fields["clip.vision.image_size"].contents())


_logs_routed = False


def _route_logs() -> None:
    """libmtmd logs every load and image to stderr; route it like llama.cpp's own log (debug level)."""
    global _logs_routed
    if not _logs_routed:
        M.mtmd_log_set(lib._route_llama_log, ctypes.c_void_p(0))
        M.mtmd_helper_log_set(lib._route_llama_log, ctypes.c_void_p(0))
        _logs_routed = True


class Projector:
    """One model's libmtmd context. Tokenizing (request threads), encoding (the engine's encoder thread) and
    the helper's whole-image evaluation (the engine thread) share it under one lock."""

    def __init__(self, path: Path, model: lib.LlamaModel, *, n_threads: int, use_gpu: bool) -> None:
        image_size = _check_projector(path)
        _route_logs()
        params = M.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        ctx = M.mtmd_init_from_file(str(path).encode(), model.ptr, params)
        if not ctx:
            raise ProjectorError(f"libmtmd could not load the vision projector {path.name}")
        self.ctx = ctx
        self.path = path
        self.marker: str = (M.mtmd_get_marker(ctx) or M.mtmd_default_marker()).decode()
        self.image_size = image_size  # what libmtmd resizes every image to
        self.n_embd = model.n_embd
        # Image rows go into the context a slice per engine step, unless the model needs the whole image in one
        # decode (non-causal attention over it) or M-RoPE positions; those take libmtmd's helper in one piece.
        self._mrope = bool(M.mtmd_decode_use_mrope(ctx))
        self._lock = threading.Lock()

    def close(self) -> None:
        if self.ctx:
            M.mtmd_free(self.ctx)
            self.ctx = None

    def tokenize(self, text: str, images: list[Image], *, add_bos: bool) -> tuple[list[int], PromptImages]:
        """`text` holds `self.marker` once per image, in order. Raises ImageTokenizeError."""
        chunks = M.mtmd_input_chunks_init()
        keep: PromptImages | None = None
        bitmaps = (M.mtmd_bitmap_p_ctypes * max(len(images), 1))()
        try:
            for i, image in enumerate(images):
                bitmaps[i] = M.mtmd_bitmap_init(image.width, image.height,
                                                 (ctypes.c_uint8 * len(image.rgb)).from_buffer_copy(image.rgb))
                if not bitmaps[i]:
                    raise ImageTokenizeError(f"image {i + 1} could not be read by libmtmd")
            raw = text.encode()
            with self._lock:
                result = M.mtmd_tokenize(self.ctx, chunks, ctypes.byref(M.mtmd_input_text(raw, len(raw), add_bos,
                                                                                           True)),
                                         bitmaps, len(images))
            if result != 0:
                raise ImageTokenizeError(f"the prompt's images could not be tokenized (libmtmd error {result})")
            tokens: list[int] = []
            spans: dict[int, tuple[int, ctypes.c_void_p]] = {}
            image_index = 0
            for i in range(M.mtmd_input_chunks_size(chunks)):
                chunk = M.mtmd_input_chunks_get(chunks, i)
                if M.mtmd_input_chunk_get_type(chunk) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ids = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    tokens.extend(ids[: n.value])
                    continue
                n_tokens = M.mtmd_input_chunk_get_n_tokens(chunk)
                spans[len(tokens)] = (n_tokens, chunk)
                tokens.extend([images[image_index].placeholder] * n_tokens)
                image_index += 1
            keep = PromptImages(chunks, spans)
            return tokens, keep
        finally:
            for bitmap in bitmaps:
                if bitmap:
                    M.mtmd_bitmap_free(bitmap)
            if keep is None:
                M.mtmd_input_chunks_free(chunks)

    def sliceable(self, chunk: ctypes.c_void_p) -> bool:
        return not (self._mrope or M.mtmd_decode_use_non_causal(self.ctx, chunk))

    def encode(self, chunk: ctypes.c_void_p, n_tokens: int) -> npt.NDArray[np.float32] | None:
        """The image chunk through the vision encoder and projector: its rows of text-model embeddings (a copy),
        or None when libmtmd fails."""
        with self._lock:
            if M.mtmd_encode_chunk(self.ctx, chunk) != 0:
                return None
            out = M.mtmd_get_output_embd(self.ctx)
            if not out:
                return None
            return np.ctypeslib.as_array(out, shape=(n_tokens * self.n_embd,)).reshape(n_tokens, self.n_embd).copy()

    def evaluate(self, context: lib.LlamaContext, chunk: ctypes.c_void_p, n_past: int, seq: int) -> int:
        """Encodes an image chunk and decodes its embeddings into `seq` at `n_past`; 0 on success. Engine
        thread only (the llama context is not thread-safe)."""
        new_n_past = C.llama_pos(0)
        with self._lock:
            result = M.mtmd_helper_eval_chunk_single(self.ctx, context.ptr, chunk, n_past, seq, context.n_batch,
                                                     False, ctypes.byref(new_n_past))
        return int(result)
