"""Errors the gateway itself answers, in the shape and wording of the API family that was called.

OpenAI `/v1/*`:  {"error": {"message", "type", "param", "code"}}
Anthropic `/v1/messages`: {"type": "error", "error": {"type", "message"}}
LM Studio `/api/*`: {"error": {"type", "message", "code", "param"}}
rendered by the model server's own `lmkube.server.errors.error_body` (which imports neither FastAPI nor the
llama.cpp engine), so the two never disagree.
"""

from __future__ import annotations

import orjson
from lmkube.server.errors import ANTHROPIC_OVERLOADED, APIError, error_body, family
from starlette.responses import Response

__all__ = ["ANTHROPIC_OVERLOADED", "GatewayError", "error_response", "family", "model_not_found",
           "stream_error_event"]


class GatewayError(APIError):
    """An error the gateway answers itself; `status` is the one sent (the gateway picks 529 for Anthropic)."""


def error_response(path: str, error: GatewayError) -> Response:
    body = error_body(family(path), error.status, error.message, type=error.type, code=error.code,
                      param=error.param)
    return Response(orjson.dumps(body), status_code=error.status, media_type="application/json",
                    headers=error.headers or None)


def stream_error_event(path: str, message: str) -> bytes:
    """The frame a model server itself sends when generation fails mid-stream, per family: OpenAI's
    `data: {"error": ...}` (then `[DONE]`), or a named `error` event (Anthropic, Responses, LM Studio chat)."""
    if path.startswith("/v1/responses"):
        data: dict[str, object] = {"type": "error", "code": "server_error", "message": message, "param": None}
    elif family(path) == "openai":
        error = error_body("openai", 500, message, type="server_error")
        return b"data: " + orjson.dumps(error) + b"\n\ndata: [DONE]\n\n"
    else:
        data = {"type": "error", **error_body(family(path), 500, message, type="server_error")}
    return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"


def model_not_found(path: str, model: str) -> GatewayError:
    """404 for a model the key may not see or that does not exist (the two are not told apart)."""
    if family(path) == "anthropic":
        return GatewayError(404, f"model: {model}", type="not_found_error", code="model_not_found", param="model")
    if family(path) == "lmstudio":
        return GatewayError(404, f"Model \"{model}\" not found.", code="model_not_found", param="model")
    return GatewayError(404, f"The model '{model}' does not exist", code="model_not_found", param="model")
