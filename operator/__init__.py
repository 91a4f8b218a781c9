"""The lmkube Kubernetes operator (LocalModel resources)."""
