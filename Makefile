# The two commands a fresh machine needs (see README): `make demo` and `make test`.
.PHONY: setup demo test lint bench

setup:
	bash scripts/setup-venv.sh

demo: setup
	.venv/bin/lmkube serve --demo

# The whole suite, as CI runs it (.ci/run calls this).
test: setup
	.venv/bin/ruff check .
	bash scripts/install-test-cluster.sh > /dev/null
	.venv/bin/pytest

lint: setup
	.venv/bin/ruff check .

bench: setup
	.venv/bin/python -m pip install --quiet -e ".[bench]" --config-settings editable_mode=strict
	.venv/bin/python bench/serve_throughput.py
