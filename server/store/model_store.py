"""The local model store: GGUF files in LM Studio's `<publisher>/<repo>/<file>.gguf` layout.

A model is a repo folder, keyed `publisher/repo` (lower-cased); each quantization in it is a variant keyed
`publisher/repo@quant`. Everything is learned from file names and GGUF headers, never by loading weights.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from .gguf_header import ArrayInfo, GGUFFormatError, GGUFHeader, read_gguf_header
from .paths import default_models_dir
from .quant import bits_per_weight, normalize_quant, pick_default, quant_from_file_type, quant_from_filename

log = logging.getLogger(__name__)

# llama.cpp architectures that only embed (no causal LM head), whatever their pooling metadata says.
EMBEDDING_ARCHITECTURES = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "modern-bert", "neo-bert",
     "t5encoder"}
)
# Download tools write these next to (or instead of) the finished file.
_TEMP_SUFFIXES = (".part", ".partial", ".incomplete", ".tmp", ".temp", ".download", ".crdownload", ".lock")
_SPLIT_RE = re.compile(r"^(?P<base>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.gguf$", re.IGNORECASE)
_MAX_DEPTH = 6  # folders below a repo folder; bounds symlink loops
_HEADER_ARRAY_LIMIT = 64  # only lengths of the tokenizer arrays are needed


class ModelNotFound(LookupError):
    """No model or variant matches `name`; `available` lists the keys that would have."""

    def __init__(self, name: str, available: Iterable[str], reason: str = "not found") -> None:
        self.name = name
        self.available = sorted(available)
        listing = ", ".join(self.available) or "none"
        super().__init__(f"model {name!r} {reason}; available: {listing}")


class ModelIncomplete(ModelNotFound):
    """The name matches a split model whose shards are not all on disk, so it cannot be loaded."""

    def __init__(self, name: str, variant: ModelVariant) -> None:
        self.variant = variant
        missing = ", ".join(str(i) for i in variant.missing_shards)
        super().__init__(name, [variant.key], f"is incomplete (missing shards: {missing})")


@dataclass(frozen=True, slots=True)
class _Facts:
    """What one file's header says; cached per (path, size, mtime)."""

    architecture: str | None = None
    name: str | None = None
    size_label: str | None = None
    file_type: int | None = None
    dominant_type: str | None = None
    context_length: int | None = None
    chat_template: str | None = None
    pooling_type: int | None = None
    vocab_size: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    param_count: int = 0


@dataclass(frozen=True, slots=True)
class ModelVariant:
    key: str  # "publisher/repo@quant", lower-case
    model_key: str
    quant: str  # canonical upper-case, e.g. "Q4_K_M"
    bits_per_weight: float | None
    path: Path  # the file to load: the first shard of a split model
    files: tuple[Path, ...]
    size_bytes: int
    architecture: str | None = None
    display_name: str | None = None
    context_length: int | None = None
    param_count: int = 0
    params_string: str | None = None
    size_label: str | None = None
    chat_template: str | None = None
    is_embedding: bool = False
    vocab_size: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    trained_for_tool_use: bool = False
    file_type: int | None = None
    missing_shards: tuple[int, ...] = ()  # 1-based shard numbers absent from disk
    mmproj_path: Path | None = None

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
    variants: list[ModelVariant] = field(default_factory=list)
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
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M")):
        if n > scale:
            break
    else:
        scale, suffix = 1e3, "K"
    scaled = n / scale
    decimals = max(2 - len(str(round(scaled)).lstrip("0")), 0)
    return f"{scaled:.{decimals}f}{suffix}"


class ModelStore:
    def __init__(self, models_dir: Path | str | None = None) -> None:
        self.models_dir = Path(models_dir).expanduser() if models_dir is not None else default_models_dir()
        self._lock = threading.Lock()
        self._facts: dict[Path, tuple[int, int, _Facts | None]] = {}
        self._signature: frozenset[tuple[Path, int, int]] | None = None
        self._entries: list[ModelEntry] = []

    def model_dir(self, publisher: str, repo: str) -> Path:
        for part in (publisher, repo):
            if part in ("", ".", "..") or "/" in part or "\\" in part:
                raise ValueError(f"invalid publisher or repo name: {part!r}")
        return self.models_dir / publisher / repo

    def scan(self) -> list[ModelEntry]:
        """All models on disk. Cheap when nothing changed: the server calls it on every /v1/models."""
        with self._lock:
            files = self._list_files()
            signature = frozenset((p, st.st_size, st.st_mtime_ns) for p, _, _, st in files)
            if signature != self._signature:
                facts = {p: self._read_facts(p, st) for p, _, _, st in files}
                self._facts = {p: self._facts[p] for p in facts}  # forget files that are gone
                self._entries = self._build(files, facts)
                self._signature = signature
            return list(self._entries)

    def resolve(self, name: str) -> ModelVariant:
        """A loadable variant for a model key, variant key (`key@quant`), bare repo name or file path."""
        entries = self.scan()
        model_part, has_quant, quant_part = name.strip().lower().partition("@")
        candidates = [e for e in entries if e.key == model_part]
        candidates = candidates or [e for e in entries if e.repo.lower() == model_part]
        if not candidates and model_part.endswith(".gguf"):
            for e in entries:
                for v in e.variants:
                    if model_part in (str(f.relative_to(self.models_dir)).lower() for f in v.files):
                        return self._loadable(name, v)
        if len(candidates) != 1:
            raise ModelNotFound(name, [e.key for e in (candidates or entries)],
                                "is ambiguous" if candidates else "not found")
        entry = candidates[0]
        if not has_quant:
            variant = entry.default_variant
        else:
            wanted = normalize_quant(quant_part)
            exact = [v for v in entry.variants if v.key == f"{entry.key}@{quant_part}"]
            same_quant = [v for v in entry.variants if v.quant == wanted]
            matches = exact or sorted(same_quant, key=lambda v: (not v.complete, v.key))
            variant = matches[0] if matches else None
        if variant is None:
            raise ModelNotFound(name, [v.key for v in entry.variants])
        return self._loadable(name, variant)

    @staticmethod
    def _loadable(name: str, variant: ModelVariant) -> ModelVariant:
        if not variant.complete:
            raise ModelIncomplete(name, variant)
        return variant

    def _list_files(self) -> list[tuple[Path, str, str, os.stat_result]]:
        """(path, publisher, repo, stat) for every candidate GGUF file under publisher/repo folders."""
        found: list[tuple[Path, str, str, os.stat_result]] = []
        for publisher in _subdirs(self.models_dir):
            for repo in _subdirs(publisher):
                stack = [(repo, 0)]
                while stack:
                    folder, depth = stack.pop()
                    if depth < _MAX_DEPTH:
                        stack.extend((sub, depth + 1) for sub in _subdirs(folder))
                    for path in _gguf_files(folder):
                        try:
                            found.append((path, publisher.name, repo.name, path.stat()))
                        except OSError:  # vanished or dangling symlink between listing and stat
                            continue
        return found

    def _read_facts(self, path: Path, st: os.stat_result) -> _Facts | None:
        cached = self._facts.get(path)
        if cached is not None and cached[:2] == (st.st_size, st.st_mtime_ns):
            return cached[2]
        try:
            facts: _Facts | None = _facts_from_header(read_gguf_header(path, max_array_len=_HEADER_ARRAY_LIMIT))
        except (GGUFFormatError, OSError) as exc:
            log.warning("skipping unreadable GGUF file %s: %s", path, exc)
            facts = None
        self._facts[path] = (st.st_size, st.st_mtime_ns, facts)
        return facts

    def _build(self, files: list[tuple[Path, str, str, os.stat_result]],
               facts: dict[Path, _Facts | None]) -> list[ModelEntry]:
        by_repo: dict[str, list[tuple[Path, str, str, os.stat_result]]] = defaultdict(list)
        for item in files:
            by_repo[f"{item[1]}/{item[2]}".lower()].append(item)
        entries = [self._entry(key, items, facts) for key, items in sorted(by_repo.items())]
        return [e for e in entries if e.variants]

    def _entry(self, key: str, items: list[tuple[Path, str, str, os.stat_result]],
               facts: dict[Path, _Facts | None]) -> ModelEntry:
        items.sort(key=lambda item: str(item[0]))
        _, publisher, repo, _ = items[0]
        sizes = {p: st.st_size for p, _, _, st in items}
        projectors = [p for p, *_ in items if _is_projector(p, facts[p])]
        groups: dict[tuple[Path, str, int], dict[int, Path]] = defaultdict(dict)
        for path, *_ in items:
            if path in projectors:
                continue
            split = _SPLIT_RE.match(path.name)
            if split is None:
                groups[(path, "", 0)][1] = path
            else:
                total = int(split["total"])
                groups[(path.parent, split["base"].lower(), total)][int(split["index"])] = path
        variants: list[ModelVariant] = []
        for (anchor, _, total), shards in groups.items():
            first = shards.get(1)
            if first is None:  # shard 1 holds all the metadata; name the file it should be
                some = next(iter(shards.values()))
                first = some.with_name(_SPLIT_RE.sub(rf"\g<base>-00001-of-{total:05d}.gguf", some.name))
            shard_facts = [facts[p] for p in shards.values()]
            if any(f is None for f in shard_facts):
                continue  # corrupt: warned about when its header was read
            head = facts.get(first) or _Facts()
            quant = quant_from_filename(first.name) or quant_from_file_type(head.file_type)
            quant = quant or normalize_quant(head.dominant_type or "") or "UNKNOWN"
            mmproj = next((p for p in projectors if p.parent == first.parent), None)
            param_count = sum(f.param_count for f in shard_facts if f)
            variants.append(ModelVariant(
                key=f"{key}@{quant.lower()}", model_key=key, quant=quant, bits_per_weight=bits_per_weight(quant),
                path=first, files=tuple(shards[i] for i in sorted(shards)),
                size_bytes=sum(sizes[p] for p in shards.values()), architecture=head.architecture,
                display_name=head.name or repo, context_length=head.context_length, param_count=param_count,
                params_string=head.size_label or (format_param_count(param_count) if param_count else None),
                size_label=head.size_label, chat_template=head.chat_template,
                is_embedding=head.architecture in EMBEDDING_ARCHITECTURES or (head.pooling_type or 0) > 0,
                vocab_size=head.vocab_size, bos_token_id=head.bos_token_id, eos_token_id=head.eos_token_id,
                trained_for_tool_use="tools" in (head.chat_template or ""), file_type=head.file_type,
                missing_shards=tuple(i for i in range(1, total + 1) if i not in shards),
                mmproj_path=mmproj or (projectors[0] if projectors else None),
            ))
        variants = _disambiguate(variants, self.models_dir / publisher / repo)
        variants.sort(key=lambda v: (v.bits_per_weight or float("inf"), v.key))
        entry = ModelEntry(key, publisher, repo, repo, self.models_dir / publisher / repo, variants,
                           projectors[0] if projectors else None)
        default = entry.default_variant
        entry.display_name = (default.display_name or repo) if default else repo
        return entry


def _disambiguate(variants: list[ModelVariant], repo_dir: Path) -> list[ModelVariant]:
    """Give every variant sharing a key a suffix from its file path, so no file is hidden by another."""
    counts: dict[str, int] = defaultdict(int)
    for v in variants:
        counts[v.key] += 1
    out = []
    for v in variants:
        if counts[v.key] > 1:
            rel = v.path.relative_to(repo_dir).as_posix()
            stem = _SPLIT_RE.sub(r"\g<base>", rel.rsplit("/", 1)[-1])
            stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
            suffix = "-".join([*rel.split("/")[:-1], stem]).lower()
            v = replace(v, key=f"{v.key}-{suffix}")
        out.append(v)
    return out


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError:
        return []


def _gguf_files(folder: Path) -> list[Path]:
    try:
        names = [p for p in folder.iterdir() if p.name.lower().endswith(".gguf")]
    except OSError:
        return []
    # Hidden and "~" files are editors' and downloaders' scratch copies.
    return [p for p in names if not p.name.startswith((".", "~")) and p.is_file()]


def _is_projector(path: Path, facts: _Facts | None) -> bool:
    return "mmproj" in path.name.lower() or (facts is not None and facts.architecture == "clip")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _facts_from_header(header: GGUFHeader) -> _Facts:
    md = header.metadata
    arch = _str(md.get("general.architecture"))
    tokens = md.get("tokenizer.ggml.tokens")
    weight_by_type: dict[str, int] = defaultdict(int)
    for t in header.tensors:
        if len(t.dims) >= 2:  # matrices decide the quantization; norms and biases stay F32
            weight_by_type[t.type_name] += t.n_elements
    return _Facts(
        architecture=arch,
        name=_str(md.get("general.name")),
        size_label=_str(md.get("general.size_label")),
        file_type=_int(md.get("general.file_type")),
        dominant_type=max(weight_by_type, key=lambda k: weight_by_type[k]) if weight_by_type else None,
        context_length=_int(md.get(f"{arch}.context_length")) if arch else None,
        chat_template=_str(md.get("tokenizer.chat_template")),
        pooling_type=_int(md.get(f"{arch}.pooling_type")) if arch else None,
        vocab_size=len(tokens) if isinstance(tokens, list | ArrayInfo) else None,
        bos_token_id=_int(md.get("tokenizer.ggml.bos_token_id")),
        eos_token_id=_int(md.get("tokenizer.ggml.eos_token_id")),
        param_count=header.param_count,
    )
