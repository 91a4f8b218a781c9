"""lmkube: an LM Studio-compatible local model server and a Kubernetes operator that runs it."""

from pathlib import Path as _Path

from lmkube import source_tree as _source_tree

__version__ = "0.1.0"

_source_tree.install(_Path(__file__).resolve().parent)
