"""The server app's OpenAPI document (what FastAPI builds from the routes; tests/test_auth.py reads the routes
from it) builds without a warning: every operation has an id of its own."""

from __future__ import annotations

import gc
import warnings
from collections import Counter
from pathlib import Path

from lmkube.server.app import create_app
from lmkube.server.config import ServerConfig


def test_the_openapi_document_builds_without_warnings_and_unique_operation_ids(tmp_path: Path) -> None:
    app = create_app(ServerConfig(models_dir=tmp_path / "models", home=tmp_path / "home"))
    # Finalize earlier tests' garbage first: a cycle collected inside the block (an unclosed socket transport's
    # ResourceWarning) is not the document's warning.
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        document = app.openapi()
    assert [str(w.message) for w in caught] == []
    operations = [(method, path, operation["operationId"])
                  for path, methods in document["paths"].items() for method, operation in methods.items()]
    ids = Counter(operation_id for _, _, operation_id in operations)
    assert [i for i, n in ids.items() if n > 1] == []
    # Both methods of the base URL are documented, each under its own id (HEAD / is Claude Code's probe).
    assert {m for m, p, _ in operations if p == "/"} == {"get", "head"}
    assert len(operations) > 30  # every family's routes, not an empty document
