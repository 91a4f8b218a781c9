"""From a model spec (`org/name`, a Hugging Face URL, `org/name@Q8_0`) to the GGUF files to download.

All network access goes through `huggingface_hub`, so HF_ENDPOINT (mirrors) and HF_TOKEN apply.
"""

from __future__ import annotations

import posixpath
import re
from collections import defaultdict
from dataclasses import dataclass
from urllib.parse import urlparse

from ..store.quant import normalize_quant, pick_default, quant_from_filename

_SPLIT_RE = re.compile(r"^(?P<base>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.gguf$", re.IGNORECASE)
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PROJECTOR_PREFERENCE = ("F16", "BF16", "F32", "Q8_0")


class DownloadError(Exception):
    """A download that cannot start; `status`/`code` become the API error, `message` says what to do."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Spec:
    raw: str
    repo_id: str | None  # "org/name" as given (case kept)
    filename: str | None  # one file of the repo, from a /blob/ or /resolve/ URL
    revision: str | None
    quantization: str | None
    is_url: bool


@dataclass(frozen=True, slots=True)
class RemoteFile:
    name: str  # path in the repo, kept as the file name in the store
    size: int | None
    sha256: str | None  # LFS sha256, when the hub gives it


@dataclass(frozen=True, slots=True)
class DownloadPlan:
    repo_id: str
    revision: str  # the commit all files come from
    quant: str | None
    files: tuple[RemoteFile, ...]

    @property
    def publisher(self) -> str:
        return self.repo_id.split("/")[0]

    @property
    def repo(self) -> str:
        return self.repo_id.split("/")[1]

    @property
    def total_size(self) -> int:
        return sum(f.size or 0 for f in self.files)


def parse_spec(model: str, quantization: str | None = None) -> Spec:
    """Parse the `model` field of a download request; raises DownloadError(400) when it is neither form."""
    raw = model.strip()
    text = raw
    if re.match(r"^(huggingface\.co|hf\.co)/", text, re.IGNORECASE):
        text = "https://" + text
    if re.match(r"^https?://", text, re.IGNORECASE):
        parts = [p for p in urlparse(text).path.split("/") if p]
        if parts and parts[0] == "models":  # huggingface.co/models/org/name is an old alias
            parts = parts[1:]
        if len(parts) < 2 or parts[0] in ("datasets", "spaces") or not _valid_repo(parts[0], parts[1]):
            raise DownloadError(400, "invalid_model", f"'{raw}' is not a Hugging Face model URL "
                                "(expected https://huggingface.co/<org>/<repo>[/blob/<revision>/<file>.gguf]).")
        filename = revision = None
        if len(parts) >= 4 and parts[2] in ("blob", "resolve", "tree"):
            revision = parts[3]
            if parts[2] != "tree" and len(parts) > 4:
                filename = "/".join(parts[4:])
        return Spec(raw, f"{parts[0]}/{parts[1]}", filename, revision, quantization, True)
    name, quant = text, quantization
    for sep in ("@", ":"):  # lms get's name@q4_k_m, llama.cpp's -hf org/name:Q4_K_M
        head, found, tail = text.rpartition(sep)
        if found and head and tail:
            name, quant = head, quantization or tail
            break
    pieces = name.split("/")
    repo_id = name if len(pieces) == 2 and _valid_repo(*pieces) else None
    return Spec(raw, repo_id, None, None, quant, False)


def _valid_repo(org: str, name: str) -> bool:
    return bool(_REPO_PART.match(org) and _REPO_PART.match(name)) and ".." not in org + name


def resolve(spec: Spec) -> DownloadPlan:
    """Ask the hub for the repo's files and pick the GGUF file(s) to fetch. Network; call from a thread."""
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    assert spec.repo_id is not None
    repo_id = spec.repo_id
    try:
        info = HfApi().model_info(repo_id, revision=spec.revision, files_metadata=True)
        plan = select_files(repo_id, info.sha or spec.revision or "main",
                            [(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None) for s in info.siblings or []],
                            spec.quantization, spec.filename)
        # A gated repo shows its file list to anyone but refuses the files: ask for the first one now, so
        # that a missing or insufficient token is an error of this request, not of a job later.
        url = hf_hub_url(repo_id, plan.files[0].name, revision=plan.revision)
        response = get_session().head(url, headers=build_hf_headers(), follow_redirects=False)
        hf_raise_for_status(response)
        return plan
    except GatedRepoError:
        raise DownloadError(403, "gated_repo", f"Hugging Face repo '{repo_id}' is gated: accept its terms on "
                            "the repo's page, then give the server a token with access (HF_TOKEN).") from None
    except RepositoryNotFoundError:
        raise DownloadError(404, "model_not_found", f"Hugging Face repo '{repo_id}' was not found (if it is "
                            "private, give the server a token with access in HF_TOKEN).") from None
    except RevisionNotFoundError:
        raise DownloadError(404, "model_not_found",
                            f"Revision '{spec.revision}' of Hugging Face repo '{repo_id}' was not found.") from None
    except HFValidationError as exc:  # a name the Hub's own rules refuse (e.g. ending in '.'), asked of nobody
        raise DownloadError(400, "invalid_model", f"'{repo_id}' is not a valid Hugging Face repo id: "
                            f"{_first_line(exc)}") from None
    except OfflineModeIsEnabled:
        raise DownloadError(503, "hub_offline", "Downloads are disabled: HF_HUB_OFFLINE is set.") from None
    except HfHubHTTPError as exc:
        raise DownloadError(502, "hub_error", f"Hugging Face hub error for '{repo_id}': {_first_line(exc)}") from None
    except OSError as exc:  # connection refused, DNS, timeouts (httpx errors are not OSErrors: below)
        raise DownloadError(502, "hub_unreachable", f"Cannot reach the Hugging Face hub: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.startswith(("httpx", "httpcore")):
            raise DownloadError(502, "hub_unreachable", f"Cannot reach the Hugging Face hub: {exc}") from None
        raise


def select_files(
    repo_id: str,
    revision: str,
    siblings: list[tuple[str, int | None, str | None]],
    quantization: str | None,
    filename: str | None = None,
) -> DownloadPlan:
    """The GGUF files for one variant (all shards of a split one), plus the repo's vision projector if any."""
    files = {name: RemoteFile(name, size, sha) for name, size, sha in siblings}
    ggufs = [f for f in files.values() if f.name.lower().endswith(".gguf")]
    projectors = [f for f in ggufs if "mmproj" in posixpath.basename(f.name).lower()]
    models = [f for f in ggufs if f not in projectors]
    if filename is not None:
        if filename not in files:
            raise DownloadError(404, "file_not_found", f"'{filename}' is not a file of Hugging Face repo '{repo_id}'.")
        if not filename.lower().endswith(".gguf"):
            raise DownloadError(400, "not_gguf", f"'{filename}' is not a GGUF file; lmkube downloads GGUF files.")
    if not models and not (filename and files[filename] in projectors):
        raise DownloadError(400, "no_gguf_files", f"Hugging Face repo '{repo_id}' has no GGUF files; lmkube "
                            "runs GGUF models only (look for a '-GGUF' repo of this model).")
    groups = _variants(models)
    group: list[RemoteFile] | None
    if filename is not None:
        group = next((g for g in groups.values() if any(f.name == filename for f in g)), [files[filename]])
    else:
        if quantization:
            wanted = normalize_quant(quantization) or quantization.strip().upper()
            group = groups.get(wanted)
            if group is None:
                available = ", ".join(sorted(groups)) or "none"
                raise DownloadError(400, "quantization_not_found", f"Hugging Face repo '{repo_id}' has no "
                                    f"'{quantization}' GGUF; available quantizations: {available}.")
        else:
            best = pick_default(groups.keys())
            assert best is not None
            group = groups[best]
    quant = quant_from_filename(group[0].name)
    chosen = list(group)
    if projectors and group[0] not in projectors:
        folder = posixpath.dirname(group[0].name)
        near = [p for p in projectors if posixpath.dirname(p.name) == folder] or projectors
        near.sort(key=lambda p: (_rank(_PROJECTOR_PREFERENCE, quant_from_filename(p.name)), p.name))
        chosen.append(near[0])
    return DownloadPlan(repo_id, revision, quant, tuple(chosen))


def _variants(models: list[RemoteFile]) -> dict[str, list[RemoteFile]]:
    """Quantization name -> its files (all shards for a split one); the first file of a name wins."""
    shards: dict[tuple[str, str, int], list[RemoteFile]] = defaultdict(list)
    for f in models:
        folder, base = posixpath.split(f.name)
        split = _SPLIT_RE.match(base)
        key = (folder, split["base"].lower(), int(split["total"])) if split else (folder, base.lower(), 0)
        shards[key].append(f)
    out: dict[str, list[RemoteFile]] = {}
    for key in sorted(shards, key=lambda k: (k[2] > 0, k)):  # whole files before split sets
        group = sorted(shards[key], key=lambda f: f.name)
        if key[2] and len(group) != key[2]:
            continue  # an incomplete split set in the repo cannot load
        quant = quant_from_filename(group[0].name) or posixpath.basename(key[1]).removesuffix(".gguf").upper()
        out.setdefault(quant, group)
    return out


def _rank(order: tuple[str, ...], name: str | None) -> int:
    return order.index(name) if name in order else len(order)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
