"""One error type for the whole server, rendered in the shape of the API family that was called.

OpenAI `/v1/*`:  {"error": {"message", "type", "param", "code"}}
Anthropic `/v1/messages`: {"type": "error", "error": {"type", "message"}}
LM Studio `/api/*`: {"error": {"type", "message", "code", "param"}}
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response

if TYPE_CHECKING:  # the gateway renders its errors with this module: no FastAPI or engine at run time
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError

    from .engine.events import QueueFull

ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
# Anthropic answers "overloaded" with 529, not 503 (its SDKs retry both). The request queue's queue-full
# error (code "queue_full", or any 503) becomes 529 on /v1/messages; the other families keep their status.
ANTHROPIC_OVERLOADED = 529


# LM Studio's native error types (its /api/v1 `error.type` enum) for the OpenAI names used in this code.
NATIVE_TYPES = {"invalid_request_error": "invalid_request", "server_error": "internal_error"}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers


class ContextOverflow(APIError):
    """The prompt does not fit the loaded context; worded per family (see `error_message`), since agent
    clients match the text to decide to compact the conversation."""

    def __init__(self, prompt_tokens: int, limit: int, *, param: str, at_least: bool = False) -> None:
        """`at_least`: `prompt_tokens` is a lower bound (the prompt was refused before it was fully counted)."""
        count = f"at least {prompt_tokens}" if at_least else str(prompt_tokens)
        super().__init__(400, f"This model's maximum context length is {limit} tokens. However, your request has "
                         f"{count} prompt tokens. Shorten the prompt or load the model with a larger "
                         "context_length.", param=param, code="context_length_exceeded")
        self.prompt_tokens = prompt_tokens
        self.limit = limit


def error_message(path: str, error: APIError) -> str:
    """The error's message in the called API's own wording."""
    if isinstance(error, ContextOverflow):
        if family(path) == "anthropic":  # Claude Code compacts on exactly this
            return f"prompt is too long: {error.prompt_tokens} tokens > {error.limit} maximum"
        if path.startswith("/v1/responses"):
            return (f"Your input exceeds the context window of this model ({error.prompt_tokens} tokens > "
                    f"{error.limit}). Please adjust your input and try again.")
    return error.message


def queue_full(exc: QueueFull) -> APIError:
    """503 (529 on /v1/messages, see error_status) with Retry-After: the instance's queue is full."""
    return APIError(503, str(exc), type="server_error", code="queue_full",
                    headers={"Retry-After": str(exc.retry_after)})


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def family(path: str) -> str:
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/api/"):
        return "lmstudio"
    return "openai"


def error_body(family: str, status: int, message: str, *, type: str = "invalid_request_error",
               code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The error body of an API family ("openai", "anthropic", "lmstudio"; see `family`), for the server's
    own errors and the gateway's. `status` is the one sent (Anthropic's `error.type` follows from it); `type`
    is the OpenAI name, which LM Studio's native enum translates."""
    match family:
        case "anthropic":
            kind = ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
            return {"type": "error", "error": {"type": kind, "message": message}}
        case "lmstudio":
            kind = NATIVE_TYPES.get(type, type)
            if code in ("model_not_found", "job_not_found"):  # their own types in the native enum
                kind = code
            body: dict[str, Any] = {"type": kind, "message": message}
            if code:
                body["code"] = code
            if param:
                body["param"] = param
            return {"error": body}
        case _:
            return {"error": {"message": message, "type": type, "param": param, "code": code}}


def api_error_body(path: str, error: APIError) -> dict[str, Any]:
    """`error`'s body for the API family of `path`, in its wording (`error_message`)."""
    return error_body(family(path), error_status(path, error), error_message(path, error), type=error.type,
                      code=error.code, param=error.param)


def error_status(path: str, error: APIError) -> int:
    if family(path) == "anthropic" and (error.status == 503 or error.code == "queue_full"):
        return ANTHROPIC_OVERLOADED
    return error.status


def error_response(request: Request, error: APIError, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(api_error_body(request.url.path, error)),
        status_code=error_status(request.url.path, error),
        media_type="application/json",
        headers={**(error.headers or {}), **(headers or {})} or None,
    )


# Pydantic names the union member that failed in `loc` ("str", "list[int]", "literal['max','off']"); a
# client's `param` is the field path without those.
_UNION_MEMBER = re.compile(r"str|int|float|bool|bytes|none|dict|list|.*[\[\](),'\"].*")


def validation_error(exc: RequestValidationError, path: str) -> APIError:
    first = exc.errors()[0] if exc.errors() else {}
    # The first part says where the field was (body, query, path); the client's `param` is the field alone.
    loc = [str(part) for index, part in enumerate(first.get("loc", ()))
           if not (index == 0 and part in ("body", "query", "path"))
           and not (isinstance(part, str) and _UNION_MEMBER.fullmatch(part))]
    if first.get("type") == "json_invalid":
        return bad_request(f"Request body is not valid JSON: {first.get('msg', 'parse error')}")
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "missing" and param is None:  # the body itself, in every family
        return bad_request("The request needs a JSON body (content-type: application/json).")
    if family(path) == "anthropic":  # Anthropic's own wording, which its clients match on: "max_tokens: Field required"
        return bad_request(f"{param}: {message}" if param else message, param=param)
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized key '{param}' in request body."
    elif first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
    elif param:
        message = f"Invalid value for '{param}': {message}"
    return bad_request(message, param=param)
