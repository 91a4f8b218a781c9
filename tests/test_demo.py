"""`lmkube serve --demo`: the offline demo model is written once and every endpoint works with it."""

from __future__ import annotations

from pathlib import Path

import openai
from support import ServerProcess


def test_demo_model_serves_chat_offline(start_server, tmp_path: Path) -> None:
    models = tmp_path / "models"
    server: ServerProcess = start_server(models, "--demo")
    demo = models / "lmkube" / "demo" / "lmkube-demo-F16.gguf"
    assert demo.is_file()
    written = demo.stat().st_mtime_ns
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="lm-studio")
    assert [m.id for m in client.models.list()] == ["lmkube/demo"]
    lengths = []
    for i in range(6):
        completion = client.chat.completions.create(
            model="lmkube/demo", messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=400, seed=i
        )
        assert completion.choices[0].message.content
        lengths.append(completion.usage.completion_tokens)
    # The demo model can end on its own, so a chat without max_tokens does not run to the full context.
    assert min(lengths) < 400
    server.stop()
    start_server(models, "--demo")
    assert demo.stat().st_mtime_ns == written  # cached, not rewritten
