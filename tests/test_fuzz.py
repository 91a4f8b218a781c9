"""Schemathesis over the app's own OpenAPI description against a real `lmkube serve` with an API token: every
operation, generated valid and invalid requests (a seeded, bounded run), and not one 5xx, dropped
connection or timeout. The Hugging Face Hub is an empty local stand-in, so downloads and searches answer
at once. The server's own /metrics count what was sent, by route and status."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from hf_hub_server import FakeHub
from prometheus_client.parser import text_string_to_metric_families
from support import ServerProcess

ServerFactory = Callable[..., ServerProcess]

TOKEN = "sk-lm-fuzzfuzz:0123456789abcdefghij"
EXAMPLES_PER_OPERATION = 30
# An endless SSE stream by design (lmkube log stream): every request would wait for the timeout.
ENDLESS = "/api/v1/logs/stream"
# In a coverage run with the other operations, schemathesis fails inside hypothesis on this operation
# ("AST constructor recursion depth mismatch" from CPython's ast.parse deep in its recursion: a tool error, not
# a finding) and sends it nothing; in a run of its own it works, so it gets one.
ALONE_IN_COVERAGE = "/api/v0/chat/completions"
SCHEMATHESIS = str(Path(sys.executable).with_name("st"))
# CPython 3.11's ast.parse, which hypothesis calls deep in schemathesis's recursion to describe a lambda, now
# and then raises this on a random operation (a tool error: nothing was sent, nothing failed). A run whose only
# problems are such errors is run again, at most twice.
TOOL_ERROR = "AST constructor recursion depth mismatch"


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    hub = FakeHub().start()
    yield hub
    hub.stop()


def openapi_document(models_dir: Path) -> dict[str, object]:
    """The OpenAPI description of the app as `lmkube serve` builds it (the server does not publish one)."""
    from fastapi.openapi.utils import get_openapi
    from lmkube.server.app import create_app
    from lmkube.server.config import ServerConfig

    app = create_app(ServerConfig(models_dir=models_dir))
    return get_openapi(title="lmkube", version="fuzz", routes=app.routes)


def http_requests(server: ServerProcess) -> Counter[tuple[str, int]]:
    """lmkube_http_requests_total by (route template, status)."""
    text = httpx.get(f"{server.base_url}/metrics", headers=server.headers, timeout=30).text
    counts: Counter[tuple[str, int]] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "lmkube_http_requests_total":
                counts[(sample.labels["route"], int(sample.labels["status"]))] += int(sample.value)
    return counts


def schemathesis(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    for _ in range(3):
        # Its crash cache (.schemathesis/) goes to `cwd`, not into the repository.
        run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd)
        summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
        if run.returncode == 0 or TOOL_ERROR not in run.stdout or "failure" in summary:
            return run
        print(f"schemathesis stopped on its own error ({TOOL_ERROR}); running it again")
    return run


def test_generated_requests_never_get_a_server_error(
    start_server: ServerFactory, models_dir: Path, hub: FakeHub, tmp_path: Path
) -> None:
    # A small context bounds every generation the fuzzer asks for; two slots keep the machine responsive.
    server = start_server(models_dir, "--api-token", TOKEN, "--ctx-size", "256", "--parallel", "2", "--no-auto-evict",
                          token=TOKEN, env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
                                            "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"})
    document = openapi_document(models_dir)
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(document))
    before = http_requests(server)
    common = [SCHEMATHESIS, "run", str(spec), "--url", server.base_url, "--checks", "not_a_server_error",
              "--header", f"Authorization: Bearer {TOKEN}", "--seed", "15", "--no-shrink", "--workers", "2",
              "--request-timeout", "120", "--warnings", "off", "--exclude-path", ENDLESS]
    runs = [schemathesis(command, tmp_path) for command in (
        [*common, "--phases", "coverage", "--exclude-path", ALONE_IN_COVERAGE],
        [*common, "--phases", "coverage", "--include-path", ALONE_IN_COVERAGE],
        [*common, "--phases", "examples,fuzzing,stateful", "--max-examples", str(EXAMPLES_PER_OPERATION)],
    )]
    sent = http_requests(server) - before
    statuses = Counter[int]()
    for (_route, status), count in sent.items():
        statuses[status] += count
    print(f"schemathesis sent {sum(statuses.values())} requests; statuses {dict(sorted(statuses.items()))}")
    # Failures (5xx), network errors (a dropped connection) and timeouts all make schemathesis exit non-zero.
    for run in runs:
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert not [status for status in statuses if status >= 500], statuses
    # Route labels keep Starlette's converters ("{job_id:path}"); the document's paths do not.
    routes = {re.sub(r":\w+}", "}", route) for route, _ in sent}
    unreached = set(document["paths"]) - routes - {ENDLESS}
    assert not unreached, (sorted(unreached), sorted(routes))  # every operation was reached
    assert server.process.poll() is None, server.log()[-3000:]
