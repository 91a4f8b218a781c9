"""API-token auth: `Authorization: Bearer <token>` or `x-api-key: <token>`, checked for every route but the
public ones by the request guard (server/request_guard.py), before a request's body is read."""

from __future__ import annotations

import hmac

from fastapi import Request

from .errors import APIError

LEARN_MORE = "Learn more at: https://lmstudio.ai/docs/developer/core/authentication."


def presented_token(request: Request) -> str | None:
    authorization = request.headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    api_key = request.headers.get("x-api-key")
    return api_key.strip() if api_key else None


def token_matches(presented: str, accepted: tuple[bytes, ...]) -> bool:
    candidate = presented.encode()
    # Compare against every token so timing reveals neither which token nor how much matched.
    matched = False
    for token in accepted:
        matched |= hmac.compare_digest(candidate, token)
    return matched


def token_error(request: Request, accepted: tuple[bytes, ...]) -> APIError | None:
    """The 401 for a request without one of the `accepted` tokens (none configured: nothing needed)."""
    if not accepted:
        return None
    token = presented_token(request)
    if token is None:
        return APIError(
            401,
            "An LM Studio API token is required to make requests to this server, but none was provided "
            "using the Authorization header using the 'Bearer' scheme (i.e., 'Authorization: Bearer "
            f"$LM_API_TOKEN'). {LEARN_MORE}",
            type="invalid_request",
            code="invalid_api_key",
        )
    if not token_matches(token, accepted):
        # Never echo more than a prefix of what the client sent: it may be a real secret elsewhere.
        return APIError(
            401,
            f"Invalid LM Studio API token provided: {token[:10]}... Ensure you are using a valid token.",
            type="invalid_request",
            code="invalid_api_key",
        )
    return None
