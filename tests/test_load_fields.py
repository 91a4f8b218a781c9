"""LM Studio's load fields on `POST /api/v1/models/load` (`flash_attention`, `eval_batch_size`,
`offload_kv_cache_to_gpu`, `num_experts`), reported by `echo_load_config` and `loaded_instances[].config`,
validated before anything reaches llama.cpp; and the `/api/v1/models` object with every field LM Studio's
current docs list. `num_experts` runs on a generated mixture-of-experts GGUF (llama.cpp's metadata override
of `<arch>.expert_used_count`), and is refused for a dense model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import ServerProcess

from lmkube.synthetic_gguf import LlamaShape, write_bert_embedding_model, write_llama_model

TEMPLATES = Path(__file__).parent / "templates"
MOE = "acme/tiny-moe"
DENSE = "acme/tiny-dense"
THINKER = "acme/r1-think"
EMBED = "acme/tiny-embed"
MOE_SHAPE = LlamaShape(n_expert=4, n_expert_used=2)


@pytest.fixture(scope="module")
def fields_server(start_server, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    models = tmp_path_factory.mktemp("load-field-models")
    write_llama_model(models / "acme" / "tiny-moe" / "tiny-moe-F16.gguf", shape=MOE_SHAPE, seed=3, name="Tiny MoE")
    write_llama_model(models / "acme" / "tiny-dense" / "tiny-dense-F16.gguf", seed=3, name="Tiny Dense")
    write_llama_model(models / "acme" / "tiny-dense" / "tiny-dense-F32.gguf", dtype="f32", seed=3, name="Tiny Dense")
    r1_template = (TEMPLATES / "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja").read_text()
    write_llama_model(models / "acme" / "r1-think" / "r1-think-F16.gguf", seed=6,
                      extra_special_tokens=("<think>", "</think>"), chat_template=r1_template)
    write_bert_embedding_model(models / "acme" / "tiny-embed" / "tiny-embed-F32.gguf", name="Tiny Embed")
    return start_server(models, "--no-auto-evict")


@pytest.fixture(scope="module")
def http(fields_server: ServerProcess) -> Iterator[httpx.Client]:
    with fields_server.client() as client:
        yield client


def load(http: httpx.Client, **body: Any) -> dict[str, Any]:
    response = http.post("/api/v1/models/load", json={"echo_load_config": True, **body})
    assert response.status_code == 200, response.text
    return response.json()


def native_error(response: httpx.Response, status: int, param: str | None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request" and error.get("param") == param
    return error["message"]


def greedy(http: httpx.Client, model: str) -> str:
    response = http.post("/v1/completions", json={"model": model, "prompt": "the model and the world",
                                                  "max_tokens": 24, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def configs(http: httpx.Client, key: str) -> dict[str, dict[str, Any]]:
    models = http.get("/api/v1/models").json()["models"]
    entry = next(m for m in models if m["key"] == key)
    return {i["id"]: i["config"] for i in entry["loaded_instances"]}


def test_load_fields_are_honoured_and_reported(http: httpx.Client) -> None:
    one = load(http, model=MOE, identifier="moe-1", num_experts=1, flash_attention=False, eval_batch_size=64,
               offload_kv_cache_to_gpu=False, context_length=512)
    assert one["load_config"] == {"context_length": 512, "eval_batch_size": 64, "parallel": 4,
                                  "flash_attention": False, "offload_kv_cache_to_gpu": False, "num_experts": 1}
    default = load(http, model=MOE, identifier="moe-default", context_length=512)
    assert default["load_config"]["num_experts"] == MOE_SHAPE.n_expert_used  # the GGUF's own number
    assert default["load_config"]["flash_attention"] is True and default["load_config"]["eval_batch_size"] == 512
    every = load(http, model=MOE, identifier="moe-4", num_experts=4, context_length=512)
    assert every["load_config"]["num_experts"] == 4
    assert configs(http, MOE) == {"moe-1": one["load_config"], "moe-default": default["load_config"],
                                  "moe-4": every["load_config"]}
    # The override reaches llama.cpp: the same weights route through other experts, so greedy text differs.
    texts = {instance: greedy(http, instance) for instance in ("moe-1", "moe-default", "moe-4")}
    assert len(set(texts.values())) == 3, texts
    assert greedy(http, "moe-default") == texts["moe-default"]  # and is deterministic
    # A dense model has no num_experts to report; an embedding model reports its context length only.
    dense = load(http, model=DENSE, identifier="dense", context_length=256)
    assert "num_experts" not in dense["load_config"]
    assert load(http, model=EMBED)["load_config"].keys() == {"context_length"}
    for instance in ("moe-1", "moe-default", "moe-4", "dense", EMBED):
        assert http.post("/api/v1/models/unload", json={"instance_id": instance}).status_code == 200


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"model": DENSE, "num_experts": 2}, "num_experts", "not a mixture-of-experts model"),
    ({"model": MOE, "num_experts": 5}, "num_experts", "between 1 and 4"),  # llama.cpp would abort the process
    ({"model": MOE, "num_experts": 0}, "num_experts", None),
    ({"model": MOE, "num_experts": 1.5}, "num_experts", None),
    ({"model": MOE, "flash_attention": "sometimes"}, "flash_attention", None),
    ({"model": MOE, "offload_kv_cache_to_gpu": 3}, "offload_kv_cache_to_gpu", None),
    ({"model": MOE, "eval_batch_size": 0}, "eval_batch_size", None),
    ({"model": MOE, "eval_batch_size": "big"}, "eval_batch_size", None),
    ({"model": MOE, "echo_load_config": "yes"}, "echo_load_config", None),
    ({"model": MOE, "n_experts": 2}, "n_experts", "Unrecognized key"),
], ids=["dense", "too-many", "zero", "fraction", "flash", "offload", "batch-zero", "batch-type", "echo", "typo"])
def test_bad_load_fields_are_a_400_in_native_shape(http: httpx.Client, body: dict[str, Any], param: str,
                                                  message: str | None) -> None:
    text = native_error(http.post("/api/v1/models/load", json=body), 400, param)
    if message is not None:
        assert message in text
    assert http.get("/api/v1/models").json()["models"]  # the server is still there
    assert all(not m["loaded_instances"] for m in http.get("/api/v1/models").json()["models"])


def test_unknown_model_with_num_experts_is_a_404(http: httpx.Client) -> None:
    response = http.post("/api/v1/models/load", json={"model": "acme/nothing", "num_experts": 2})
    assert response.status_code == 404 and response.json()["error"]["type"] == "model_not_found"


def test_models_carry_every_documented_field(http: httpx.Client) -> None:
    models = {m["key"]: m for m in http.get("/api/v1/models").json()["models"]}
    llm_fields = {"type", "publisher", "key", "display_name", "architecture", "quantization", "size_bytes",
                  "params_string", "loaded_instances", "max_context_length", "format", "capabilities",
                  "description", "variants", "selected_variant"}
    for key in (MOE, DENSE, THINKER):
        model = models[key]
        assert llm_fields <= model.keys(), key
        assert model["type"] == "llm" and model["format"] == "gguf" and model["architecture"] == "llama"
        assert set(model["quantization"]) == {"name", "bits_per_weight"}
        assert isinstance(model["capabilities"]["vision"], bool) and model["capabilities"]["vision"] is False
        assert isinstance(model["capabilities"]["trained_for_tool_use"], bool)
        assert model["selected_variant"] in model["variants"]
    assert models[DENSE]["variants"] == ["acme/tiny-dense@f16", "acme/tiny-dense@f32"]
    assert models[DENSE]["selected_variant"] == "acme/tiny-dense@f16"
    assert models[THINKER]["capabilities"]["reasoning"] == {"allowed_options": ["off", "on"], "default": "on"}
    assert "reasoning" not in models[DENSE]["capabilities"]
    embed = models[EMBED]
    assert embed["type"] == "embedding" and not {"architecture", "capabilities", "description"} & embed.keys()
