"""`lmkube gateway`: one OpenAI/Anthropic/LM Studio-compatible endpoint for every LocalModel in the cluster.

Installs as `lmkube.gateway`. One job per module:

| module | job |
|---|---|
| `catalog.py` | what a model is (namespace, name, key, aliases, ready replicas) and the snapshot discovery keeps |
| `static.py` | discovery from a file (local use and tests) |
| `kube.py` | discovery from the Kubernetes API: LocalModels and their ready pods, watched |
| `resolve.py` | a request's `model` (key, name, alias, `namespace/name`) to one LocalModel |
| `keys.py` | gateway API keys and what each may use (Secrets labelled `lmkube.dev/gateway-key`, or a file) |
| `balance.py` | least outstanding requests + prefix affinity (consistent hashing with bounded load) |
| `limits.py` | per-key concurrency limits |
| `errors.py` | errors in each API family's own shape |
| `metrics.py` | the gateway's own Prometheus metrics |
| `proxy.py` | the streaming reverse proxy to one replica |
| `upstream.py` | the HTTP/1.1 client it relays with (asyncio + httptools, keep-alive pool per replica) |
| `routes.py` | which model a request is for, model lists |
| `app.py` | the ASGI app that ties them together |
"""
