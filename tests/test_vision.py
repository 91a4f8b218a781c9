"""Vision: a generated llama model with a generated projector (libmtmd's `mlp` type) behind a real server.

Every API family takes images as its official client sends them (openai and anthropic SDKs, httpx for the
native API), the usage counts image tokens, a second turn about the same image reuses its KV instead of
encoding it again, and each bad input is a 400 in the family's own error shape.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from cli_support import run_cli
from conftest import ServerFactory
from hf_hub_server import FakeHub
from PIL import Image
from support import ServerProcess, wait_until

from lmkube.synthetic_gguf import write_llama_model
from lmkube.synthetic_mmproj import VisionShape, write_mmproj

VISION = "acme/tiny-vision"
TEXT_ONLY = "acme/tiny-text"
IMAGE_TOKENS = VisionShape().image_tokens  # 16
SLOW_VISION = "acme/slow-vision"
SLOW_SHAPE = VisionShape(image_size=224, patch_size=14, n_embd=256, n_ff=1024, n_layer=4, n_head=4)


def png(color: tuple[int, int, int], size: tuple[int, int] = (48, 40), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


RED, BLUE = data_url(png((220, 20, 20))), data_url(png((20, 20, 220)))


def chat_parts(*urls: str, text: str = "What is in this picture?") -> list[dict[str, Any]]:
    return [{"type": "text", "text": text}, *({"type": "image_url", "image_url": {"url": u}} for u in urls)]


@pytest.fixture(scope="module")
def vision_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("vision-models")
    folder = models / "acme" / "tiny-vision"
    write_llama_model(folder / "tiny-vision-F16.gguf", seed=7, name="Tiny Vision")
    write_mmproj(folder / "mmproj-tiny-vision-F32.gguf", text_n_embd=64)
    write_llama_model(models / "acme" / "tiny-text" / "tiny-text-F16.gguf", seed=8, name="Tiny Text")
    # A projector whose encode takes a while (hundreds of ms on 2 cores): time to cancel in the middle of one.
    slow = models / "acme" / "slow-vision"
    write_llama_model(slow / "slow-vision-F16.gguf", seed=10, name="Slow Vision")
    write_mmproj(slow / "mmproj-slow-vision-F32.gguf", text_n_embd=64, shape=SLOW_SHAPE)
    return models


@pytest.fixture(scope="module")
def vision_server(start_server: ServerFactory, vision_models: Path) -> ServerProcess:
    return start_server(vision_models, "--parallel", "4")


@pytest.fixture(scope="module")
def oai(vision_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{vision_server.base_url}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def claude(vision_server: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=vision_server.base_url, api_key="none", max_retries=0)


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    values = [float(m.group(1)) for m in re.finditer(rf'^{name}{{model="{VISION}"}} (\S+)$', text, re.M)]
    return sum(values)


def wait_until_idle(server: ServerProcess) -> None:
    def idle() -> bool:
        instances = httpx.get(f"{server.base_url}/api/v1/instances").json()["instances"]
        return not any(i["active"] or i["queued"] for i in instances)
    wait_until(idle, timeout=30, message="an instance stayed busy")


def test_vision_model_is_listed_with_its_capability(vision_server: ServerProcess) -> None:
    v1 = {m["key"]: m for m in httpx.get(f"{vision_server.base_url}/api/v1/models").json()["models"]}
    assert v1[VISION]["capabilities"]["vision"] is True
    assert v1[TEXT_ONLY]["capabilities"]["vision"] is False
    v0 = {m["id"]: m for m in httpx.get(f"{vision_server.base_url}/api/v0/models").json()["data"]}
    assert v0[VISION]["type"] == "vlm" and "vision" in v0[VISION]["capabilities"]
    assert v0[TEXT_ONLY]["type"] == "llm"
    table = run_cli("ls", server=vision_server).out
    assert re.search(rf"^{VISION} .* vision\s*$", table, re.M) and not re.search(rf"^{TEXT_ONLY} .*vision", table, re.M)
    listed = run_cli("ls", "--json", server=vision_server)
    assert listed.code == 0, listed.err
    by_key = {m["modelKey"]: m for m in json.loads(listed.out)}
    assert by_key[VISION]["vision"] is True and by_key[TEXT_ONLY]["vision"] is False
    estimate = httpx.post(f"{vision_server.base_url}/api/v1/models/load",
                          json={"model": VISION, "estimate_only": True}, timeout=60).json()
    assert estimate["estimate"]["projector_bytes"] > 100_000  # the ~120 KB projector file


def test_chat_completions_one_and_two_images_count_image_tokens(oai: openai.OpenAI) -> None:
    one = oai.chat.completions.create(model=VISION, max_tokens=4, messages=[
        {"role": "user", "content": chat_parts(RED)}])
    two = oai.chat.completions.create(model=VISION, max_tokens=4, messages=[
        {"role": "user", "content": chat_parts(RED, BLUE)}])
    assert one.choices[0].message.content and two.choices[0].message.content
    assert one.usage is not None and two.usage is not None
    assert two.usage.prompt_tokens - one.usage.prompt_tokens == IMAGE_TOKENS  # the second image's tokens
    pieces = []
    for chunk in oai.chat.completions.create(model=VISION, max_tokens=4, stream=True,
                                             stream_options={"include_usage": True},
                                             messages=[{"role": "user", "content": chat_parts(BLUE, RED)}]):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            assert chunk.usage.prompt_tokens == two.usage.prompt_tokens
    assert "".join(pieces)


def test_the_image_changes_the_answer(oai: openai.OpenAI) -> None:
    def answer(url: str) -> str:
        reply = oai.chat.completions.create(model=VISION, max_tokens=12, temperature=0, messages=[
            {"role": "user", "content": chat_parts(url)}])
        return reply.choices[0].message.content or ""
    noise = Image.effect_noise((48, 40), 100).convert("RGB")
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    assert answer(RED) == answer(RED)  # greedy and the same pixels: the same tokens
    assert {answer(RED), answer(BLUE), answer(data_url(buffer.getvalue()))} != {answer(RED)}


def test_second_turn_about_the_same_image_does_not_encode_it_again(oai: openai.OpenAI,
                                                                   vision_server: ServerProcess) -> None:
    image = data_url(png((10, 200, 90), (64, 64)))
    turn = [{"role": "user", "content": chat_parts(image, text="Describe it.")}]
    first = oai.chat.completions.create(model=VISION, max_tokens=6, temperature=0, messages=turn)
    encoded = metric(vision_server, "lmkube_images_evaluated_total")
    turn += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And the colour?"}]
    second = oai.chat.completions.create(model=VISION, max_tokens=6, messages=turn)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens > IMAGE_TOKENS  # past the image
    assert metric(vision_server, "lmkube_images_evaluated_total") == encoded


def test_responses_input_image(oai: openai.OpenAI) -> None:
    content = [{"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": RED},
               {"type": "input_image", "image_url": BLUE}]
    response = oai.responses.create(model=VISION, max_output_tokens=4,
                                    input=[{"role": "user", "content": content}])
    assert response.output_text and response.usage is not None
    assert response.usage.input_tokens > 2 * IMAGE_TOKENS
    kinds = [e.type for e in oai.responses.create(model=VISION, max_output_tokens=4, stream=True,
                                                  input=[{"role": "user", "content": content}])]
    assert kinds[-1] in ("response.completed", "response.incomplete")  # 4 tokens may cut it short
    assert "response.output_text.delta" in kinds


def test_messages_image_blocks(claude: anthropic.Anthropic) -> None:
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": RED.split(",", 1)[1]}}
    one = claude.messages.create(model=VISION, max_tokens=4, messages=[
        {"role": "user", "content": [block, {"type": "text", "text": "What is this?"}]}])
    two = claude.messages.create(model=VISION, max_tokens=4, messages=[
        {"role": "user", "content": [block, block, {"type": "text", "text": "What is this?"}]}])
    def prompt(message: anthropic.types.Message) -> int:  # Anthropic counts cache reads apart from input_tokens
        return message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
    assert one.content and prompt(two) - prompt(one) == IMAGE_TOKENS
    counted = claude.messages.count_tokens(model=VISION, messages=[
        {"role": "user", "content": [block, {"type": "text", "text": "What is this?"}]}])
    assert counted.input_tokens == prompt(one)  # image tokens counted as /v1/messages counts them
    with claude.messages.stream(model=VISION, max_tokens=4, messages=[
            {"role": "user", "content": [block, {"type": "text", "text": "Again?"}]}]) as stream:
        final = stream.get_final_message()
    assert prompt(final) > IMAGE_TOKENS and final.stop_reason in ("end_turn", "max_tokens")


def test_native_chat_image_items(vision_server: ServerProcess) -> None:
    body = {"model": VISION, "max_output_tokens": 4,
            "input": [{"type": "text", "content": "What is this?"}, {"type": "image", "data_url": RED}]}
    reply = httpx.post(f"{vision_server.base_url}/api/v1/chat", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    stats = reply.json()["stats"]
    assert stats["input_tokens"] > IMAGE_TOKENS
    encoded = metric(vision_server, "lmkube_images_evaluated_total")
    follow_up = httpx.post(f"{vision_server.base_url}/api/v1/chat", timeout=60, json={
        "model": VISION, "max_output_tokens": 4, "input": "And the colour?",
        "previous_response_id": reply.json()["response_id"]})
    assert follow_up.status_code == 200, follow_up.text
    assert follow_up.json()["stats"]["input_tokens"] > stats["input_tokens"]  # the stored turn kept its image
    assert metric(vision_server, "lmkube_images_evaluated_total") == encoded  # and its KV was reused
    body["input"].append({"type": "image", "data_url": BLUE})
    with httpx.stream("POST", f"{vision_server.base_url}/api/v1/chat", json={**body, "stream": True},
                      timeout=60) as stream:
        events = [line.removeprefix("event: ") for line in stream.iter_lines() if line.startswith("event: ")]
    assert events[-1] == "chat.end"


BAD_IMAGES = {
    "corrupt": ("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n not really").decode(),
                "invalid_image"),
    "bmp": (data_url(png((1, 2, 3), fmt="BMP"), "image/bmp"), "unsupported_image_type"),
    "too many pixels": (data_url(png((0, 0, 0), (8000, 6000))), "image_too_large"),
    "not base64": ("data:image/png;base64,%%%", "invalid_image"),
    "remote url": ("https://example.com/cat.png", "image_url_not_allowed"),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_images_are_400_in_each_family(case: str, vision_server: ServerProcess) -> None:
    url, code = BAD_IMAGES[case]
    base = vision_server.base_url
    chat = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
        "model": VISION, "max_tokens": 2, "messages": [{"role": "user", "content": chat_parts(url)}]})
    assert chat.status_code == 400 and chat.json()["error"]["code"] == code, chat.text
    responses = httpx.post(f"{base}/v1/responses", timeout=60, json={
        "model": VISION, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": url}]}]})
    assert responses.status_code == 400 and responses.json()["error"]["code"] == code, responses.text
    source = ({"type": "url", "url": url} if url.startswith("https")
              else {"type": "base64", "media_type": "image/png", "data": url.split(",", 1)[1]})
    messages = httpx.post(f"{base}/v1/messages", timeout=60, json={
        "model": VISION, "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image", "source": source}, {"type": "text", "text": "?"}]}]})
    body = messages.json()
    assert messages.status_code == 400 and body["type"] == "error", messages.text
    assert body["error"]["type"] == "invalid_request_error"
    native = httpx.post(f"{base}/api/v1/chat", timeout=60, json={
        "model": VISION, "input": [{"type": "image", "data_url": url}]})
    assert native.status_code == 400 and native.json()["error"]["type"] == "invalid_request", native.text


def test_too_many_images(vision_server: ServerProcess) -> None:
    reply = httpx.post(f"{vision_server.base_url}/v1/chat/completions", timeout=60, json={
        "model": VISION, "max_tokens": 2, "messages": [{"role": "user", "content": chat_parts(*[RED] * 9)}]})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "too_many_images"


def test_gif_and_webp_and_jpeg(oai: openai.OpenAI) -> None:
    for fmt, mime in (("GIF", "image/gif"), ("WEBP", "image/webp"), ("JPEG", "image/jpeg")):
        reply = oai.chat.completions.create(model=VISION, max_tokens=2, messages=[
            {"role": "user", "content": chat_parts(data_url(png((90, 90, 9), fmt=fmt), mime))}])
        assert reply.usage is not None and reply.usage.prompt_tokens > IMAGE_TOKENS, fmt


def test_image_for_a_text_only_model_is_400_in_each_family(oai: openai.OpenAI, claude: anthropic.Anthropic,
                                                           vision_server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as chat:
        oai.chat.completions.create(model=TEXT_ONLY, max_tokens=2, messages=[
            {"role": "user", "content": chat_parts(RED)}])
    assert chat.value.code == "model_not_vision_capable"
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model=TEXT_ONLY, input=[
            {"role": "user", "content": [{"type": "input_image", "image_url": RED}]}])
    with pytest.raises(anthropic.BadRequestError) as messages:
        claude.messages.create(model=TEXT_ONLY, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": RED.split(",", 1)[1]}}]}])
    assert messages.value.body["error"]["type"] == "invalid_request_error"
    native = httpx.post(f"{vision_server.base_url}/api/v1/chat", timeout=60, json={
        "model": TEXT_ONLY, "input": [{"type": "image", "data_url": RED}]})
    assert native.status_code == 400 and native.json()["error"]["code"] == "model_not_vision_capable"


def test_cancel_while_images_are_encoded_frees_the_slots(oai: openai.OpenAI, vision_server: ServerProcess) -> None:
    for i in range(6):  # more than the 4 slots: a slot that was not freed would leave a request queued
        url = data_url(png((i, 40 * i, 7), (300 + i, 200)))
        stream = oai.chat.completions.create(model=SLOW_VISION, max_tokens=5000, stream=True, messages=[
            {"role": "user", "content": chat_parts(url, url, url)}])
        stream.response.close()  # gone while its images are being encoded
    wait_until_idle(vision_server)
    reply = oai.chat.completions.create(model=SLOW_VISION, max_tokens=2, messages=[
        {"role": "user", "content": chat_parts(RED)}])
    assert reply.usage is not None and reply.usage.prompt_tokens > SLOW_SHAPE.image_tokens
    assert vision_server.process.poll() is None


def test_text_streams_keep_flowing_while_images_are_evaluated(oai: openai.OpenAI,
                                                             vision_server: ServerProcess) -> None:
    tokens: list[float] = []
    images_done = threading.Event()
    ended_early = threading.Event()

    def text_stream() -> None:  # on the slow projector's model too: one instance, one engine
        stream = oai.chat.completions.create(model=SLOW_VISION, max_tokens=1800, stream=True, messages=[
            {"role": "user", "content": "Tell me a long story."}])
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                tokens.append(time.monotonic())
            if images_done.is_set():
                stream.response.close()
                return
        ended_early.set()

    reader = threading.Thread(target=text_stream)
    reader.start()
    try:
        wait_until(lambda: len(tokens) >= 5, timeout=60, message="the text stream did not start")
        before = len(tokens)
        for i in range(3):
            url = data_url(png((i * 80, 3, 3), (128, 96)))
            reply = oai.chat.completions.create(model=SLOW_VISION, max_tokens=2, messages=[
                {"role": "user", "content": chat_parts(url, url)}])
            assert reply.usage is not None and reply.usage.prompt_tokens > 2 * SLOW_SHAPE.image_tokens
        during = len(tokens) - before
    finally:
        images_done.set()
        reader.join(timeout=120)
    assert not ended_early.is_set(), "the text stream ended before the images were in: nothing was measured"
    assert during > 0  # the text stream advanced while the images were encoded and decoded
    wait_until_idle(vision_server)


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/red.png":
            body = png((220, 20, 20))
        elif self.path == "/huge.png":
            body = b"\0" * (21 << 20)  # past the 20 MB limit
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """A local web server with images: what `--allow-image-urls` lets the server fetch."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_image_urls_are_fetched_only_when_allowed(start_server: ServerFactory, vision_server: ServerProcess,
                                                  vision_models: Path, image_host: str) -> None:
    fetching = start_server(vision_models, "--allow-image-urls", "--parallel", "1")
    client = anthropic.Anthropic(base_url=fetching.base_url, api_key="none", max_retries=0)
    reply = client.messages.create(model=VISION, max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": f"{image_host}/red.png"}},
        {"type": "text", "text": "?"}]}])
    assert reply.usage.input_tokens + (reply.usage.cache_read_input_tokens or 0) > IMAGE_TOKENS
    for path, code in (("/missing.png", "image_fetch_failed"), ("/huge.png", "image_too_large")):
        answer = httpx.post(f"{fetching.base_url}/v1/chat/completions", timeout=60, json={
            "model": VISION, "max_tokens": 2,
            "messages": [{"role": "user", "content": chat_parts(f"{image_host}{path}")}]})
        assert answer.status_code == 400 and answer.json()["error"]["code"] == code, answer.text
    refused = httpx.post(f"{vision_server.base_url}/v1/chat/completions", timeout=60, json={
        "model": VISION, "max_tokens": 2,
        "messages": [{"role": "user", "content": chat_parts(f"{image_host}/red.png")}]})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "image_url_not_allowed"


def test_a_broken_projector_is_a_load_error_not_a_dead_server(start_server: ServerFactory,
                                                              tmp_path: Path) -> None:
    folder = tmp_path / "models" / "acme" / "broken-vision"
    write_llama_model(folder / "broken-vision-F16.gguf", seed=9)
    write_mmproj(folder / "mmproj-broken-F32.gguf")
    projector = folder / "mmproj-broken-F32.gguf"
    # The same file with its vision-encoder flag renamed: libmtmd alone would fail (or crash) on it.
    projector.write_bytes(projector.read_bytes().replace(b"clip.has_vision_encoder", b"clip.has_vision_xxxxxxx"))
    server = start_server(tmp_path / "models")
    reply = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=60, json={
        "model": "acme/broken-vision", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code >= 400 and "clip.has_vision_encoder" in reply.json()["error"]["message"], reply.text
    assert server.process.poll() is None
    assert httpx.get(f"{server.base_url}/v1/models", timeout=10).status_code == 200


def test_downloading_a_repo_with_a_projector_brings_it_along(start_server: ServerFactory, tmp_path: Path) -> None:
    """What an operator's LocalModel download does (it asks the pod's server): the projector comes with the model."""
    source = tmp_path / "hub-files"
    model = write_llama_model(source / "seer-Q4_K_M.gguf", seed=21, name="Seer")
    projector = write_mmproj(source / "mmproj-seer-F16.gguf")
    hub = FakeHub().start()
    try:
        hub.add_repo("hub-org/Seer-GGUF", {model.name: model, projector.name: projector, "README.md": b"# seer\n"})
        models = tmp_path / "models"
        server = start_server(models, env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "",
                                           "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"})
        started = httpx.post(f"{server.base_url}/api/v1/models/download", json={"model": "hub-org/Seer-GGUF"},
                             timeout=60).json()

        def finished() -> dict[str, Any] | None:
            state = httpx.get(f"{server.base_url}/api/v1/models/download/status/{started['job_id']}").json()
            return None if state["status"] == "downloading" else state
        assert wait_until(finished, timeout=60)["status"] == "completed"
        assert (models / "hub-org" / "Seer-GGUF" / projector.name).read_bytes() == projector.read_bytes()
        listed = {m["key"]: m for m in httpx.get(f"{server.base_url}/api/v1/models").json()["models"]}
        assert listed["hub-org/seer-gguf"]["capabilities"]["vision"] is True
        reply = httpx.post(f"{server.base_url}/v1/chat/completions", timeout=60, json={
            "model": "hub-org/seer-gguf", "max_tokens": 2, "messages": [{"role": "user", "content": chat_parts(RED)}]})
        assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] > IMAGE_TOKENS, reply.text
    finally:
        hub.stop()


def test_the_projectors_marker_typed_in_text_is_just_text(oai: openai.OpenAI) -> None:
    typed = oai.chat.completions.create(model=VISION, max_tokens=2, messages=[
        {"role": "user", "content": chat_parts(RED, text="What is <__media__> here <__lmkube_image__>?")}])
    assert typed.usage is not None and typed.usage.prompt_tokens > IMAGE_TOKENS
