"""The local model store: GGUF files in LM Studio's `<publisher>/<repo>/<file>.gguf` layout.

A model is a repo folder, keyed `publisher/repo` (lower-cased); each quantization in it is a variant keyed
`publisher/repo@quant`. Everything is learned from file names and GGUF headers, never by loading weights.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, NamedTuple

from .gguf_header import ArrayInfo, GGUFFormatError, GGUFHeader, read_gguf_header
from .paths import default_models_dir
from .quant import bits_per_weight, normalize_quant, pick_default, quant_from_file_type, quant_from_filename

log = logging.getLogger(__name__)

# llama.cpp architectures that only embed (no causal LM head), whatever their pooling metadata says.
EMBEDDING_ARCHITECTURES = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert", "neo-bert",
     "t5encoder"}
)
_SPLIT_RE = re.compile(r"^(?P<base>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.gguf$", re.IGNORECASE)
_MAX_DEPTH = 6  # folders below a repo folder; bounds symlink loops
_HEADER_ARRAY_LIMIT = 64  # only lengths of the tokenizer arrays are needed


class ModelNotFound(LookupError):
    """No model or variant matches `name`; `available` lists the keys that would have."""

    def __init__(self, name: str, available: Iterable[str], reason: str = "not found") -> None:
        self.name = name
        self.reason = reason
        self.available = sorted(available)
        listing = ", ".join(self.available) or "none"
        super().__init__(f"model {name!r} {reason}; available: {listing}")


class ModelIncomplete(ModelNotFound):
    """The name matches a split model whose shards are not all on disk, so it cannot be loaded."""

    def __init__(self, name: str, variant: ModelVariant) -> None:
        self.variant = variant
        missing = ", ".join(str(i) for i in variant.missing_shards)
        super().__init__(name, [variant.key], f"is incomplete (missing shards: {missing})")


@dataclass(frozen=True, slots=True, kw_only=True)
class GGUFInfo:
    """What a GGUF header says about the model in it (for a split model: its first shard)."""

    architecture: str | None = None
    display_name: str | None = None  # general.name
    size_label: str | None = None  # general.size_label, e.g. "7B", "8x7B"
    file_type: int | None = None  # general.file_type (llama_ftype)
    dominant_tensor_type: str | None = None  # ggml type holding the most matrix weights
    context_length: int | None = None  # trained context, {arch}.context_length
    block_count: int | None = None  # layers, {arch}.block_count: what GPU offload counts
    embedding_length: int | None = None  # {arch}.embedding_length: the embedding vector size
    chat_template: str | None = None
    pooling_type: int | None = None  # {arch}.pooling_type; > 0 means the model produces embeddings
    is_embedding: bool = False
    trained_for_tool_use: bool = False
    vocab_size: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    param_count: int = 0  # sum of tensor element counts (over all shards, on a ModelVariant)
    expert_count: int | None = None  # {arch}.expert_count: experts per layer of a MoE model; None when dense
    expert_used_count: int | None = None  # {arch}.expert_used_count: the experts each token goes through


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelVariant(GGUFInfo):
    key: str  # "publisher/repo@quant", lower-case
    model_key: str
    quant: str  # canonical upper-case, e.g. "Q4_K_M"
    bits_per_weight: float | None
    path: Path  # the file to load: the first shard of a split model
    files: tuple[Path, ...]
    size_bytes: int
    params_string: str | None = None  # "135M", "7B": size_label, else computed from param_count
    missing_shards: tuple[int, ...] = ()  # 1-based numbers of split shards absent from disk
    mmproj_path: Path | None = None  # vision projector: one in the same folder, else the model's

    @property
    def complete(self) -> bool:
        return not self.missing_shards

    @property
    def type(self) -> Literal["llm", "embedding"]:
        return "embedding" if self.is_embedding else "llm"


@dataclass(slots=True)
class ModelEntry:
    key: str  # "publisher/repo", lower-case
    publisher: str
    repo: str
    display_name: str
    path: Path  # the repo folder
    variants: list[ModelVariant] = field(default_factory=list)  # ascending bits per weight
    mmproj_path: Path | None = None  # vision projector, if the repo ships one

    @property
    def default_variant(self) -> ModelVariant | None:
        # A loadable variant beats a closer-bpw one with missing shards.
        complete = [v for v in self.variants if v.complete]
        return pick_default(complete or self.variants, lambda v: v.quant)

    @property
    def type(self) -> Literal["llm", "embedding"]:
        default = self.default_variant
        return default.type if default else "llm"

    @property
    def architecture(self) -> str | None:
        default = self.default_variant
        return default.architecture if default else None


def format_param_count(n: int) -> str:
    """Same notation as llama.cpp's converter uses for `general.size_label`: 135M, 7.6B, 71B."""
    scale, suffix = next(((s, x) for s, x in ((1e12, "T"), (1e9, "B"), (1e6, "M")) if n > s), (1e3, "K"))
    scaled = n / scale
    decimals = max(2 - len(str(round(scaled)).lstrip("0")), 0)
    return f"{scaled:.{decimals}f}{suffix}"


class _File(NamedTuple):
    path: Path
    publisher: str  # folder names as on disk; keys are their lower-cased join
    repo: str
    size: int
    mtime_ns: int


class ModelStore:
    def __init__(self, models_dir: Path | str | None = None) -> None:
        self.models_dir = Path(models_dir).expanduser() if models_dir is not None else default_models_dir()
        self._lock = threading.Lock()  # the server scans from several request threads at once
        self._infos: dict[Path, tuple[int, int, GGUFInfo | None]] = {}
        self._files: list[_File] | None = None
        self._entries: list[ModelEntry] = []

    def model_dir(self, publisher: str, repo: str) -> Path:
        """Where a model's files go; rejects names that would escape the models folder."""
        for part in (publisher, repo):
            if part in ("", ".", "..") or "/" in part or "\\" in part:
                raise ValueError(f"invalid publisher or repo name: {part!r}")
        return self.models_dir / publisher / repo

    def scan(self) -> list[ModelEntry]:
        """All models on disk. Cheap when nothing changed: the server calls it on every /v1/models."""
        with self._lock:
            files = self._list_files()
            if files != self._files:
                infos = {f.path: self._read_info(f) for f in files}
                self._infos = {p: self._infos[p] for p in infos}  # forget files that are gone
                by_repo: dict[str, list[_File]] = defaultdict(list)
                for f in files:
                    by_repo[f"{f.publisher}/{f.repo}".lower()].append(f)
                entries = (self._entry(key, group, infos) for key, group in sorted(by_repo.items()))
                self._entries = [e for e in entries if e.variants]
                self._files = files
            return list(self._entries)

    def resolve(self, name: str) -> ModelVariant:
        """A loadable variant for a model key, variant key (`key@quant`), bare repo name or file path.

        Raises ModelNotFound (listing what would match) or its subclass ModelIncomplete.
        """
        entries = self.scan()
        model_part, has_quant, quant_part = name.strip().lower().partition("@")
        candidates = [e for e in entries if e.key == model_part]
        candidates = candidates or [e for e in entries if e.repo.lower() == model_part]
        if not candidates and model_part.endswith(".gguf"):  # LM Studio's publisher/repo/file.gguf form
            for v in (v for e in entries for v in e.variants):
                if model_part in (f.relative_to(self.models_dir).as_posix().lower() for f in v.files):
                    return _loadable(name, v)
        if len(candidates) != 1:
            reason = "is ambiguous" if candidates else "not found"
            raise ModelNotFound(name, [e.key for e in (candidates or entries)], reason)
        entry = candidates[0]
        variant = entry.default_variant
        if has_quant:
            exact = [v for v in entry.variants if v.key == f"{entry.key}@{quant_part}"]
            wanted = normalize_quant(quant_part)
            same = [v for v in entry.variants if v.quant == wanted]
            same.sort(key=lambda v: (not v.complete, v.key))
            variant = next(iter(exact or same), None)
        if variant is None:
            raise ModelNotFound(name, [v.key for v in entry.variants])
        return _loadable(name, variant)

    def _list_files(self) -> list[_File]:
        found: list[_File] = []
        for publisher in _children(self.models_dir)[0]:
            for repo in _children(publisher)[0]:
                stack = [(repo, 0)]
                while stack:
                    folder, depth = stack.pop()
                    subdirs, ggufs = _children(folder)
                    if depth < _MAX_DEPTH:
                        stack.extend((sub, depth + 1) for sub in subdirs)
                    for path in ggufs:
                        try:
                            st = path.stat()
                        except OSError:  # vanished, or a dangling symlink
                            continue
                        found.append(_File(path, publisher.name, repo.name, st.st_size, st.st_mtime_ns))
        return sorted(found)

    def _read_info(self, f: _File) -> GGUFInfo | None:
        cached = self._infos.get(f.path)
        if cached is not None and cached[:2] == (f.size, f.mtime_ns):
            return cached[2]
        info: GGUFInfo | None = None
        try:
            info = _info_from_header(read_gguf_header(f.path, max_array_len=_HEADER_ARRAY_LIMIT))
        except (GGUFFormatError, OSError) as exc:
            log.warning("skipping unreadable GGUF file %s: %s", f.path, exc)
        self._infos[f.path] = (f.size, f.mtime_ns, info)
        return info

    def _entry(self, key: str, files: list[_File], infos: dict[Path, GGUFInfo | None]) -> ModelEntry:
        publisher, repo = files[0].publisher, files[0].repo
        sizes = {f.path: f.size for f in files}
        projectors = [f.path for f in files if _is_projector(f.path, infos[f.path])]
        variants: list[ModelVariant] = []
        for total, shards in _group_shards([f.path for f in files if f.path not in projectors]):
            shard_infos = [infos[p] for p in shards.values()]
            if any(i is None for i in shard_infos):
                continue  # corrupt: warned about when its header was read
            some = next(iter(shards.values()))
            # Shard 1 carries all the metadata; when it is missing, name the file that should be there.
            first = shards.get(1) or some.with_name(
                _SPLIT_RE.sub(rf"\g<base>-00001-of-{total:05d}.gguf", some.name))
            head = infos.get(first) or GGUFInfo()
            params = sum(i.param_count for i in shard_infos if i)
            quant = quant_from_filename(first.name) or quant_from_file_type(head.file_type)
            quant = quant or normalize_quant(head.dominant_tensor_type or "") or "UNKNOWN"
            projector = next((p for p in projectors if p.parent == first.parent), None)
            variants.append(ModelVariant(
                **{f.name: getattr(head, f.name) for f in fields(GGUFInfo)}
                | {"display_name": head.display_name or repo, "param_count": params},
                key=f"{key}@{quant.lower()}", model_key=key, quant=quant,
                bits_per_weight=bits_per_weight(quant), path=first,
                files=tuple(shards[i] for i in sorted(shards)),
                size_bytes=sum(sizes[p] for p in shards.values()),
                params_string=head.size_label or (format_param_count(params) if params else None),
                missing_shards=tuple(i for i in range(1, total + 1) if i not in shards),
                mmproj_path=projector or (projectors[0] if projectors else None),
            ))
        variants = _disambiguate(variants, self.models_dir)
        variants.sort(key=lambda v: (v.bits_per_weight or float("inf"), v.key))
        entry = ModelEntry(key, publisher, repo, repo, self.models_dir / publisher / repo, variants,
                           projectors[0] if projectors else None)
        default = entry.default_variant
        entry.display_name = (default.display_name or repo) if default else repo
        return entry


def _group_shards(paths: list[Path]) -> list[tuple[int, dict[int, Path]]]:
    """(shard total, {shard number: path}) per variant; a single file is shard 1 of 1."""
    groups: dict[tuple[Path, str, int], dict[int, Path]] = defaultdict(dict)
    for path in paths:
        split = _SPLIT_RE.match(path.name)
        if split is None:
            groups[(path, "", 1)][1] = path
        else:
            total = int(split["total"])
            groups[(path.parent, split["base"].lower(), total)][int(split["index"])] = path
    return [(total, shards) for (_, _, total), shards in groups.items()]


def _loadable(name: str, variant: ModelVariant) -> ModelVariant:
    if not variant.complete:
        raise ModelIncomplete(name, variant)
    return variant


def _disambiguate(variants: list[ModelVariant], models_dir: Path) -> list[ModelVariant]:
    """Suffix every variant that shares its key with the file's name (and folders inside the repo).

    Suffixing all of them, not all but one, keeps a variant's key stable when another file appears.
    """
    counts = Counter(v.key for v in variants)
    out = []
    for v in variants:
        if counts[v.key] > 1:
            inner = v.path.relative_to(models_dir).parts[2:-1]  # folders inside the repo folder
            stem = _SPLIT_RE.sub(r"\g<base>", v.path.name)
            stem = stem[: -len(".gguf")] if stem.lower().endswith(".gguf") else stem
            v = replace(v, key=f"{v.key}-{'-'.join([*inner, stem]).lower()}")
        out.append(v)
    return out


def _children(folder: Path) -> tuple[list[Path], list[Path]]:
    """(sub-folders, GGUF files) of `folder`, sorted, skipping hidden and "~" entries.

    Downloads in progress end in .part/.incomplete/... so never look like GGUF files; hidden and "~"
    entries are editors' and downloaders' scratch space (huggingface_hub's .cache/ among them).
    """
    try:
        visible = sorted(p for p in folder.iterdir() if not p.name.startswith((".", "~")))
    except OSError:
        return [], []
    dirs = [p for p in visible if p.is_dir()]
    return dirs, [p for p in visible if p.name.lower().endswith(".gguf") and p.is_file()]


def _is_projector(path: Path, info: GGUFInfo | None) -> bool:
    return "mmproj" in path.name.lower() or (info is not None and info.architecture == "clip")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _info_from_header(header: GGUFHeader) -> GGUFInfo:
    md = header.metadata
    arch = _str(md.get("general.architecture"))
    template = _str(md.get("tokenizer.chat_template"))
    pooling = _int(md.get(f"{arch}.pooling_type"))
    tokens = md.get("tokenizer.ggml.tokens")
    matrix_weights: Counter[str] = Counter()
    for t in header.tensors:
        if len(t.dims) >= 2:  # matrices decide the quantization; norms and biases stay F32
            matrix_weights[t.type_name] += t.n_elements
    return GGUFInfo(
        architecture=arch,
        display_name=_str(md.get("general.name")),
        size_label=_str(md.get("general.size_label")),
        file_type=_int(md.get("general.file_type")),
        dominant_tensor_type=matrix_weights.most_common(1)[0][0] if matrix_weights else None,
        context_length=_int(md.get(f"{arch}.context_length")),
        block_count=_int(md.get(f"{arch}.block_count")),
        embedding_length=_int(md.get(f"{arch}.embedding_length")),
        chat_template=template,
        pooling_type=pooling,
        is_embedding=arch in EMBEDDING_ARCHITECTURES or (pooling or 0) > 0,
        trained_for_tool_use=template is not None and "tools" in template,
        vocab_size=len(tokens) if isinstance(tokens, list | ArrayInfo) else None,
        bos_token_id=_int(md.get("tokenizer.ggml.bos_token_id")),
        eos_token_id=_int(md.get("tokenizer.ggml.eos_token_id")),
        param_count=header.param_count,
        expert_count=_int(md.get(f"{arch}.expert_count")) or None,
        expert_used_count=_int(md.get(f"{arch}.expert_used_count")) or None,
    )
