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
