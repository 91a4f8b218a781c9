"""Errors the gateway itself answers, in the shape and wording of the API family that was called.

OpenAI `/v1/*`:  {"error": {"message", "type", "param", "code"}}
Anthropic `/v1/messages`: {"type": "error", "error": {"type", "message"}}
LM Studio `/api/*`: {"error": {"type", "message", "code", "param"}}
(the same shapes the model server uses, lmkube.server.errors; repeated here so the gateway does not import
the server and its llama.cpp engine.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson
from starlette.responses import Response

ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                   502: "api_error", 503: "overloaded_error", 504: "api_error", 529: "overloaded_error"}
# Anthropic answers "overloaded" with 529, not 503 (its SDKs retry both), as the model server does.
ANTHROPIC_OVERLOADED = 529
# LM Studio's native `error.type` for the OpenAI names the gateway uses.
NATIVE_TYPES = {"invalid_request_error": "invalid_request", "server_error": "internal_error"}


def family(path: str) -> str:
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/api/"):
        return "lmstudio"
    return "openai"


@dataclass
class GatewayError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)


def error_body(path: str, error: GatewayError) -> dict[str, object]:
    match family(path):
        case "anthropic":
            kind = ANTHROPIC_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
            return {"type": "error", "error": {"type": kind, "message": error.message}}
        case "lmstudio":
            native = NATIVE_TYPES.get(error.type, error.type)
            if error.code == "model_not_found":  # its own type in the native enum
                native = error.code
            body: dict[str, object] = {"type": native, "message": error.message}
            if error.code:
                body["code"] = error.code
            if error.param:
                body["param"] = error.param
            return {"error": body}
        case _:
            return {"error": {"message": error.message, "type": error.type, "param": error.param,
                              "code": error.code}}


def error_response(path: str, error: GatewayError) -> Response:
    return Response(orjson.dumps(error_body(path, error)), status_code=error.status,
                    media_type="application/json", headers=error.headers or None)


def stream_error_event(path: str, message: str) -> bytes:
    """The frame a model server itself sends when generation fails mid-stream, per family: OpenAI's
    `data: {"error": ...}` (then `[DONE]`), or a named `error` event (Anthropic, Responses, LM Studio chat)."""
    if path.startswith("/v1/messages"):
        data: dict[str, object] = {"type": "error", "error": {"type": "api_error", "message": message}}
    elif path.startswith("/api/"):
        data = {"type": "error", "error": {"type": "internal_error", "message": message}}
    elif path.startswith("/v1/responses"):
        data = {"type": "error", "code": "server_error", "message": message, "param": None}
    else:
        error = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
        return b"data: " + orjson.dumps(error) + b"\n\ndata: [DONE]\n\n"
    return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"


def model_not_found(path: str, model: str) -> GatewayError:
    """404 for a model the key may not see or that does not exist (the two are not told apart)."""
    if family(path) == "anthropic":
        return GatewayError(404, f"model: {model}", type="not_found_error", code="model_not_found", param="model")
    if family(path) == "lmstudio":
        return GatewayError(404, f"Model \"{model}\" not found.", code="model_not_found", param="model")
    return GatewayError(404, f"The model '{model}' does not exist", code="model_not_found", param="model")
