# The two commands a fresh machine needs (see README): `make demo` and `make test`.
.PHONY: setup demo test lint bench image

setup:
	bash scripts/setup-venv.sh

demo: setup
	.venv/bin/lmkube serve --demo

# The whole suite, as CI runs it (.ci/run calls this).
test: setup
	.venv/bin/ruff check .
	.venv/bin/mypy
	bash scripts/install-test-cluster.sh > /dev/null
	bash scripts/install-image-tools.sh
	bash scripts/install-agent-clients.sh > /dev/null
	.venv/bin/pytest

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

bench: setup
	.venv/bin/python -m pip install --quiet -e ".[bench]"
	bash scripts/build-llama-server.sh > /dev/null
	.venv/bin/python bench/run_all.py

# The server image (CPU) with buildah; BACKEND=cuda for the GPU variant, PUSH=registry/prefix to push.
image:
	bash scripts/install-image-tools.sh
	bash scripts/build-image.sh --backend $(or $(BACKEND),cpu) $(if $(PUSH),--push $(PUSH))
