"""Where lmkube keeps its state: `$LMKUBE_HOME` (default `~/.lmkube`), models under `$LMKUBE_HOME/models`."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "LMKUBE_HOME"
DEFAULT_HOME = "~/.lmkube"


def lmkube_home() -> Path:
    # An empty LMKUBE_HOME (as `LMKUBE_HOME= lmkube ...` or a blank env entry in a pod spec) means unset,
    # not the current directory.
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser()


def default_models_dir() -> Path:
    return lmkube_home() / "models"


MAX_NAME_LENGTH = 200
_FORBIDDEN_CHARS = frozenset(chr(c) for c in range(32)) | {"\x7f", "\\"}


def check_name(name: str) -> str:
    """The one format of model keys, variant keys and instance identifiers a client may send: up to 200
    characters, `/`-separated parts that are neither empty nor `.` / `..`, no backslash or control
    character. Names become paths in the store and labels in logs and metrics; `../../etc/passwd` is none."""
    if not name or len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"must be 1 to {MAX_NAME_LENGTH} characters")
    if any(char in _FORBIDDEN_CHARS for char in name):
        raise ValueError("must not contain control characters or backslashes")
    if any(part.strip() in ("", ".", "..") for part in name.split("/")):
        raise ValueError("must be '/'-separated names, none of them empty, '.' or '..'")
    return name
