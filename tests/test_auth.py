"""API-token auth against real `lmkube serve` processes: every API route needs a token (read from the
app itself, so new routes are covered), LM Studio's 401 body, both headers, the openai SDK, and the
token sources (--api-token, --api-token-file, LMKUBE_API_TOKENS)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from support import CHAT_MODEL, EMBED_MODEL, LMKUBE, ServerProcess

ServerFactory = Callable[..., ServerProcess]

TOKEN_SHAPE = re.compile(r"sk-lm-[A-Za-z0-9]{8}:[A-Za-z0-9]{20}")
PUBLIC_ROUTES = {("GET", "/health"), ("GET", "/lmstudio-greeting"), ("GET", "/"), ("HEAD", "/")}
MISSING_TOKEN_MESSAGE = (  # LM Studio's own wording (captured from a 0.4.x server log)
    "An LM Studio API token is required to make requests to this server, but none was provided using the "
    "Authorization header using the 'Bearer' scheme (i.e., 'Authorization: Bearer $LM_API_TOKEN'). "
    "Learn more at: https://lmstudio.ai/docs/developer/core/authentication."
)
MESSAGES = [{"role": "user", "content": "hello"}]


def new_tokens(count: int) -> list[str]:
    """Tokens from `lmkube token new` (run side by side), each checked against LM Studio's
    sk-lm-XXXXXXXX:YYYYYYYYYYYYYYYYYYYY shape."""
    processes = [subprocess.Popen([LMKUBE, "token", "new"], stdout=subprocess.PIPE, text=True) for _ in range(count)]
    tokens = []
    for process in processes:
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        token = out.strip()
        assert TOKEN_SHAPE.fullmatch(token), f"not an LM Studio token: {token!r}"
        assert out == token + "\n"
        tokens.append(token)
    return tokens


def new_token() -> str:
    return new_tokens(1)[0]


def api_routes(models_dir: Path) -> list[tuple[str, str]]:
    """Every (METHOD, path) the app serves, read from the app itself (via its OpenAPI description)."""
    from fastapi.openapi.utils import get_openapi
    from lmkube.server.app import create_app
    from lmkube.server.config import ServerConfig

    app = create_app(ServerConfig(models_dir=models_dir))
    spec = get_openapi(title="lmkube", version="test", routes=app.routes)
    return sorted((method.upper(), path) for path, operations in spec["paths"].items() for method in operations)


def concrete(path: str) -> str:
    """A request path for a route template: path parameters become a model key."""
    return re.sub(r"\{[^}]+\}", CHAT_MODEL, path)


def unauthorized_problem(response: httpx.Response, *, missing: bool, sent: str | None = None) -> str | None:
    """Why `response` is not LM Studio's 401 for a missing or rejected token; None when it is."""
    if response.status_code != 401:
        return f"status {response.status_code}: {response.text[:200]}"
    body = response.json()
    if response.request.url.path.startswith("/v1/messages"):  # the Anthropic family keeps its own envelope
        if body.get("type") != "error" or body["error"].get("type") != "authentication_error":
            return f"not an Anthropic authentication error: {body}"
        message = body["error"]["message"]
    else:
        error = body.get("error")
        if not isinstance(error, dict) or (error.get("type"), error.get("code")) != ("invalid_request",
                                                                                      "invalid_api_key"):
            return f"not LM Studio's invalid_api_key error: {body}"
        message = error["message"]
    if missing and message != MISSING_TOKEN_MESSAGE:
        return f"unexpected message for a missing token: {message!r}"
    if not missing and "LM Studio API token" not in message:
        return f"unexpected message for a wrong token: {message!r}"
    if sent and sent in message:
        return f"the rejected token is echoed in full: {message!r}"
    return None


@pytest.fixture(scope="module")
def token() -> str:
    return new_token()


@pytest.fixture(scope="module")
def auth_server(start_server: ServerFactory, models_dir: Path, token: str) -> ServerProcess:
    return start_server(models_dir, "--api-token", token, token=token)


def test_token_new_prints_a_fresh_token_each_time() -> None:
    assert len(set(new_tokens(4))) == 4


def test_route_listing_covers_the_api(models_dir: Path) -> None:
    routes = set(api_routes(models_dir))
    assert routes >= PUBLIC_ROUTES
    assert routes >= {
        ("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"), ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"), ("POST", "/v1/embeddings"), ("GET", "/api/v1/models"),
        ("POST", "/api/v1/models/load"), ("POST", "/api/v1/models/unload"), ("GET", "/api/v1/instances"),
    }


def test_every_route_but_the_probes_requires_a_token(auth_server: ServerProcess, models_dir: Path,
                                                     token: str) -> None:
    wrong = "sk-lm-Wrong123:abcdefghijABCDEFGHIJ"
    rejected: list[tuple[dict[str, str], bool, str | None]] = [
        ({}, True, None),
        ({"Authorization": "Bearer"}, True, None),
        ({"Authorization": f"Basic {token}"}, True, None),  # only the Bearer scheme carries a token
        ({"Authorization": f"Bearer {wrong}"}, False, wrong),
        ({"x-api-key": wrong}, False, wrong),
        ({"Authorization": f"Bearer {token[:-1]}"}, False, token[:-1]),  # a near miss is no match
        ({"Authorization": f"Bearer {token}x"}, False, token + "x"),
    ]
    problems: list[str] = []
    with httpx.Client(base_url=auth_server.base_url, timeout=60) as client:
        for method, path in api_routes(models_dir):
            url = concrete(path)
            body: dict[str, Any] | None = None if method == "GET" else {}
            if (method, path) in PUBLIC_ROUTES:
                response = client.request(method, url)
                if response.status_code != 200:
                    problems.append(f"{method} {path} (public) -> {response.status_code}")
                continue
            for headers, missing, sent in rejected:
                problem = unauthorized_problem(client.request(method, url, headers=headers, json=body),
                                               missing=missing, sent=sent)
                if problem:
                    problems.append(f"{method} {path} with {headers}: {problem}")
            if method != "GET":  # a body that does not even parse still gets the 401 first
                malformed = client.request(method, url, content=b"{not json",
                                           headers={"content-type": "application/json"})
                if problem := unauthorized_problem(malformed, missing=True):
                    problems.append(f"{method} {path} with a malformed body: {problem}")
            for headers in ({"Authorization": f"Bearer {token}"}, {"x-api-key": token}):
                # Only the status matters; a stream (e.g. /api/v1/logs/stream) never ends by itself.
                with client.stream(method, url, headers=headers, json=body) as accepted:
                    if accepted.status_code == 401 or accepted.status_code >= 500:
                        problems.append(f"{method} {path} with the right token -> {accepted.status_code}")
    assert not problems, "\n".join(problems)


def test_bearer_and_x_api_key_both_authenticate(auth_server: ServerProcess, token: str) -> None:
    url = f"{auth_server.base_url}/v1/chat/completions"
    body = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 2}
    for headers in ({"Authorization": f"Bearer {token}"}, {"authorization": f"bearer {token}"}, {"x-api-key": token}):
        response = httpx.post(url, json=body, headers=headers, timeout=60)
        assert response.status_code == 200, (headers, response.text)
        assert response.json()["choices"][0]["message"]["content"]
    models = httpx.get(f"{auth_server.base_url}/api/v1/models", headers={"x-api-key": token})
    assert models.status_code == 200 and models.json()["models"]


def test_openai_sdk_with_the_right_and_a_wrong_key(auth_server: ServerProcess, token: str) -> None:
    base_url = f"{auth_server.base_url}/v1"
    client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0)
    assert CHAT_MODEL in [m.id for m in client.models.list()]
    completion = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=3)
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    assert len(client.embeddings.create(model=EMBED_MODEL, input="hi").data[0].embedding) == 64

    for key in ("sk-lm-00000000:00000000000000000000", "lm-studio"):  # well-formed, and the usual placeholder
        bad = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
        calls: list[Callable[[], object]] = [
            lambda bad=bad: bad.models.list(),
            lambda bad=bad: bad.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=1),
            lambda bad=bad: bad.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=1,
                                                        stream=True),
            lambda bad=bad: bad.embeddings.create(model=EMBED_MODEL, input="hi"),
        ]
        for call in calls:
            with pytest.raises(openai.AuthenticationError) as caught:
                call()
            assert caught.value.status_code == 401
            assert (caught.value.code, caught.value.type) == ("invalid_api_key", "invalid_request")


def test_a_rejected_token_is_not_echoed(auth_server: ServerProcess, token: str) -> None:
    wrong = new_token()
    response = httpx.get(f"{auth_server.base_url}/v1/models", headers={"Authorization": f"Bearer {wrong}"})
    assert unauthorized_problem(response, missing=False, sent=wrong) is None
    message = response.json()["error"]["message"]
    assert wrong.split(":")[1] not in message  # nothing of the secret half
    assert token not in message and token.split(":")[1] not in message


def test_tokens_from_flags_files_and_the_environment(start_server: ServerFactory, models_dir: Path,
                                                     tmp_path: Path) -> None:
    flag, in_file, also_in_file, commented, in_env, also_in_env, unknown = new_tokens(7)
    token_file = tmp_path / "tokens.txt"
    token_file.write_text(f"# {commented}\n\n  {in_file}  \n{also_in_file}\n")
    server = start_server(models_dir, "--api-token", flag, "--api-token-file", str(token_file),
                          env={"LMKUBE_API_TOKENS": f"{in_env}, {also_in_env}"}, token=flag)
    assert "(5 API token(s) required)" in server.log()
    for accepted in (flag, in_file, also_in_file, in_env, also_in_env):
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=accepted, max_retries=0)
        assert client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=1).choices
    for rejected in (commented, f"# {commented}", unknown):
        response = httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": f"Bearer {rejected}"})
        assert unauthorized_problem(response, missing=False, sent=rejected) is None
    assert unauthorized_problem(httpx.get(f"{server.base_url}/v1/models"), missing=True) is None


def test_the_environment_alone_turns_auth_on(start_server: ServerFactory, models_dir: Path) -> None:
    token = new_token()
    server = start_server(models_dir, env={"LMKUBE_API_TOKENS": token}, token=token)
    assert unauthorized_problem(httpx.get(f"{server.base_url}/api/v1/models"), missing=True) is None
    assert httpx.get(f"{server.base_url}/api/v1/models", headers=server.headers).status_code == 200


def test_an_unreadable_token_file_stops_the_server(models_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [LMKUBE, "serve", "--models-dir", str(models_dir), "--port", "1",
         "--api-token-file", str(tmp_path / "missing.txt")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "cannot read API token file" in result.stderr


def test_tokens_never_reach_the_server_log(start_server: ServerFactory, models_dir: Path, tmp_path: Path) -> None:
    flag, from_file, wrong = new_tokens(3)
    token_file = tmp_path / "tokens.txt"
    token_file.write_text(from_file + "\n")
    server = start_server(models_dir, "--log-level", "debug", "--api-token", flag,
                          "--api-token-file", str(token_file), token=flag)
    body = {"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 2}
    for headers in ({"Authorization": f"Bearer {flag}"}, {"x-api-key": from_file},
                    {"Authorization": f"Bearer {wrong}"}, {"x-api-key": wrong}):
        httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        httpx.post(f"{server.base_url}/v1/chat/completions", content=b"{bad", timeout=60,
                   headers={**headers, "content-type": "application/json"})
        httpx.get(f"{server.base_url}/api/v1/models?x=1", headers=headers)
    openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=flag, max_retries=0).models.list()
    log = server.log()
    assert "POST /v1/chat/completions" in log  # the requests were logged, just not their credentials
    for secret in (flag, from_file, wrong):
        assert secret not in log
        assert secret.split(":")[1] not in log


def test_cors_preflight_needs_no_token_and_errors_carry_cors_headers(start_server: ServerFactory,
                                                                     models_dir: Path) -> None:
    token = new_token()
    server = start_server(models_dir, "--cors", "--api-token", token, token=token)
    origin = {"Origin": "http://example.test"}
    preflight = httpx.options(f"{server.base_url}/v1/chat/completions", headers={
        **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization",
    })
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] in ("*", "http://example.test")
    denied = httpx.get(f"{server.base_url}/v1/models", headers=origin)
    assert unauthorized_problem(denied, missing=True) is None
    assert "access-control-allow-origin" in denied.headers  # so a browser app can read why
    allowed = httpx.get(f"{server.base_url}/v1/models", headers={**origin, **server.headers})
    assert allowed.status_code == 200
