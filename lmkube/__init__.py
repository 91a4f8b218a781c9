"""lmkube: an LM Studio-compatible local model server and a Kubernetes operator that runs it."""

__version__ = "0.1.0"
