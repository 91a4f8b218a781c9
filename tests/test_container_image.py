"""The container image, built for real from the Dockerfile with buildah (scripts/build-image.sh) and run.

No registry is reachable here, so the CPU image is built on a local Debian base made with debootstrap;
buildah's layer cache (under $LMKUBE_CACHE/image) makes repeat runs quick. The first build compiles
llama.cpp inside the builder stage (minutes). `pytest -m "not image"` skips these tests locally.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from PIL import Image
from project_image import BUILD_TIMEOUT, ROOT, Buildah
from support import REAL_MODEL, ServerProcess, free_port

from lmkube import __version__

COMPILERS = ("gcc", "cc", "c++", "g++", "clang", "cmake", "make", "ld", "as", "nvcc", "ninja")


@dataclass(frozen=True)
class BuiltImage:
    name: str
    buildah: Buildah

    def inspect(self) -> dict[str, Any]:
        return json.loads(self.buildah("inspect", "--type", "image", self.name).stdout)


@pytest.fixture(scope="module")
def image(built_image: tuple[str, Buildah]) -> BuiltImage:
    """The session's one build (tests/conftest.py), shared with the real-node tests."""
    return BuiltImage(*built_image)


@pytest.fixture
def container(image: BuiltImage) -> Iterator[str]:
    """A working container from the image, removed afterwards."""
    name = image.buildah("from", "--pull=never", image.name).stdout.strip()
    try:
        yield name
    finally:
        image.buildah("rm", name, check=False)


def test_dockerfile_pins_the_llama_cpp_python_of_pyproject() -> None:
    pinned = re.search(r"^ARG LLAMA_CPP_PYTHON_VERSION=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert pinned is not None
    assert f"llama-cpp-python=={pinned.group(1)}" in deps


@pytest.mark.image
@pytest.mark.timeout(BUILD_TIMEOUT + 120)
def test_image_config(image: BuiltImage) -> None:
    config = image.inspect()["Docker"]["config"]
    assert config["User"] == "1000:1000"  # the uid/gid the operator's pods run as
    assert config["Entrypoint"] == ["lmkube"]
    assert config["Cmd"] == ["serve", "--host", "0.0.0.0", "--port", "1234", "--models-dir", "/models"]
    assert config["WorkingDir"] == "/models"
    assert list(config["Volumes"]) == ["/models"]
    assert list(config["ExposedPorts"]) == ["1234/tcp"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["LMKUBE_HOME"] == "/models/.lmkube"
    assert env["HF_HOME"].startswith("/models/")
    assert env["PATH"].startswith("/opt/lmkube/bin:")
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.title"] == "lmkube"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["dev.lmkube.backend"] == "cpu"


@pytest.mark.image
@pytest.mark.timeout(BUILD_TIMEOUT + 120)
def test_final_image_has_no_compilers_and_no_build_secrets(image: BuiltImage, container: str) -> None:
    probe = " ; ".join(f"command -v {tool}" for tool in COMPILERS)
    found = image.buildah("run", "--isolation", "chroot", container, "--", "sh", "-c", f"{probe} ; true")
    assert found.stdout.strip() == "", f"build tools left in the image:\n{found.stdout}"

    rootfs = Path(image.buildah("mount", container).stdout.strip())
    try:
        leftovers = [p for d in ("usr/bin", "usr/local/bin", "usr/local/cuda/bin") if (rootfs / d).is_dir()
                     for p in (rootfs / d).iterdir() if re.fullmatch(r"(x86_64-linux-gnu-|aarch64-linux-gnu-)?"
                                                                       r"(gcc|g\+\+|cc|c\+\+|cpp|cmake|nvcc)(-\d+)?",
                                                                       p.name)]
        assert leftovers == []
        assert not (rootfs / "usr/include/stdio.h").exists()  # no libc6-dev either
        # The proxy CA bundle and pip config were build secrets: mounted while RUN steps ran, never stored.
        assert not (rootfs / "etc/pip.conf").exists()
        secrets = rootfs / "run" / "secrets"
        assert not secrets.exists() or not any(secrets.iterdir())
        assert (rootfs / "models").stat().st_uid == 1000
        assert (rootfs / "opt/lmkube/bin/lmkube").is_file()
    finally:
        image.buildah("umount", container, check=False)


@pytest.mark.image
@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_container_serves_the_demo_model(image: BuiltImage, container: str, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "container.log"
    # chroot isolation shares the host's network, so the host reaches the server on 127.0.0.1.
    argv = image.buildah.argv("run", "--isolation", "chroot", "--network", "host", container, "--",
                              "lmkube", "serve", "--demo", "--host", "127.0.0.1", "--port", str(port),
                              "--models-dir", "/models", "--threads", "1")
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = ServerProcess(process=process, port=port, log_path=log_path)
    try:
        server.wait_ready(timeout=120)
        with server.client() as http:
            models = http.get("/v1/models").json()
        # The real model is baked into the image (the build has network access, this run needs none).
        assert [m["id"] for m in models["data"]] == [REAL_MODEL, "lmkube/demo", "lmkube/demo-vision"]

        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="lm-studio", timeout=300)
        reply = client.chat.completions.create(
            model="lmkube/demo", messages=[{"role": "user", "content": "hi"}], max_tokens=8, seed=1)
        assert reply.model == "lmkube/demo"
        assert isinstance(reply.choices[0].message.content, str)
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
        answer = client.chat.completions.create(
            model=REAL_MODEL, messages=[{"role": "user", "content": "Write one sentence about the sea."}],
            temperature=0, max_tokens=100)
        assert answer.choices[0].finish_reason == "stop"
        assert "sea" in (answer.choices[0].message.content or "").lower()
        # Vision in the image: Pillow decodes the picture and libmtmd encodes it (64 image tokens).
        picture = io.BytesIO()
        Image.new("RGB", (80, 60), (30, 120, 200)).save(picture, "PNG")
        url = "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()
        seen = client.chat.completions.create(model="lmkube/demo-vision", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}])
        assert seen.usage is not None and seen.usage.prompt_tokens > 64
        health = httpx.get(f"{server.base_url}/health", timeout=5)
        assert health.status_code == 200
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    # The demo model was written by uid 1000 into the models volume, not into the read-only image parts.
    listing = image.buildah("run", "--isolation", "chroot", container, "--", "sh", "-c",
                            "find /models -name '*.gguf' -user 1000 | head -n 5; id -u")
    lines = listing.stdout.split()
    assert lines[-1] == "1000"
    assert any(line.startswith("/models/") and line.endswith(".gguf") for line in lines[:-1]), server.log()


# Runs in the container as its user: the server's own MCP session code starts each stdio server, lists its
# tools and calls one, as a request's integration would.
MCP_PROBE = """
import asyncio, json
from lmkube.server.mcp.servers import ServerSpec
from lmkube.server.mcp.sessions import McpSessions

async def main():
    sessions = McpSessions(call_timeout=60, idle_timeout=600)
    found = {}
    for name, spec in {"python": ServerSpec(command="python", args=("/srv/mcp/server.py",)),
                       "executable": ServerSpec(command="/srv/mcp/run-server")}.items():
        connection = await sessions.server(name, spec).connect()
        result = await connection.call("add", {"a": 2, "b": 40})
        found[name] = {"tools": sorted(t.name for t in connection.tools), "add": result.content[0].text}
    await sessions.close()
    print(json.dumps(found))

asyncio.run(main())
"""


@pytest.mark.image
@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_image_runs_stdio_mcp_servers(image: BuiltImage, container: str, tmp_path: Path) -> None:
    """What a LocalModel's mcp.json can start in the image: a Python server (the image's python has the `mcp`
    SDK) and a plain executable (here a shell script)."""
    script = tmp_path / "run-server"
    script.write_text("#!/bin/sh\nexec python /srv/mcp/server.py \"$@\"\n")
    image.buildah("copy", "--chmod", "0644", container, str(ROOT / "tests" / "mcp_stdio_test_server.py"),
                  "/srv/mcp/server.py")
    image.buildah("copy", "--chmod", "0755", container, str(script), "/srv/mcp/run-server")
    probe = image.buildah("run", "--isolation", "chroot", container, "--", "python", "-c", MCP_PROBE)
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    tools = ["add", "crash", "grow", "hang", "whoami"]
    assert found == {"python": {"tools": tools, "add": "42"}, "executable": {"tools": tools, "add": "42"}}
