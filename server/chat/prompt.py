"""Turns chat messages into prompt tokens with the model's own template."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..engine.llama_lib import TooManyTokens
from ..errors import APIError, ContextOverflow
from ..runtime.chat_template import ChatTemplateError
from ..runtime.instance import ModelInstance
from .tool_prompt import fold_late_system, has_late_system


def _flatten_content(content: Any) -> Any:
    """Text parts become one string: most templates expect `content` to be a string."""
    if not isinstance(content, list):
        return content
    texts: list[str] = []
    for part in content:
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text"):
            texts.append(str(part.get("text", "")))
        elif kind in ("image_url", "input_image", "image"):
            raise APIError(400, "This model does not support images (it has no vision projector).",
                           param="messages", code="model_not_vision_capable")
        else:
            raise APIError(400, f"Unsupported content part type {kind!r}.", param="messages")
    return "".join(texts)


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    normalized = []
    for message in messages:
        item = {k: v for k, v in message.items() if v is not None}
        item["content"] = _flatten_content(item.get("content")) or ""
        if item["role"] == "developer":  # OpenAI's newer name for the system role
            item["role"] = "system"
        normalized.append(item)
    return normalized


def render_chat(
    instance: ModelInstance,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    **template_kwargs: Any,
) -> str:
    normalized = normalize_messages(messages)
    try:
        return instance.template.render(normalized, tools=tools, **template_kwargs)
    except ChatTemplateError as exc:
        if has_late_system(normalized):  # many templates allow a system message only first
            try:
                return instance.template.render(fold_late_system(normalized), tools=tools, **template_kwargs)
            except ChatTemplateError:
                pass
        raise APIError(400, str(exc), param="messages", code="chat_template_error") from exc


def prompt_tokens(instance: ModelInstance, text: str, *, param: str = "messages") -> list[int]:
    """Tokenizes rendered chat text; templates that already start with BOS do not get a second one.

    Raises ContextOverflow (a 400) for a prompt that leaves no room in the context."""
    model = instance.model
    bos = instance.template.bos_token
    add_bos = model.add_bos and not (bos and text.startswith(bos)) and model.bos_id >= 0
    n_ctx = instance.context_length
    try:
        tokens = model.tokenize(text, add_special=False, parse_special=True, limit=n_ctx - 1 - add_bos)
    except TooManyTokens as exc:
        raise ContextOverflow(exc.count + add_bos, n_ctx, param=param) from None
    return [model.bos_id, *tokens] if add_bos else tokens


def refuse_oversized(instance: ModelInstance, texts: Iterable[str], *, param: str = "messages") -> None:
    """Refuses, before any templating or tokenizing, text so long it cannot fit the context whatever its
    tokens: each token stands for at most `longest_token_bytes` bytes (so characters)."""
    chars = sum(len(text) for text in texts)
    n_ctx = instance.context_length
    if chars < n_ctx:  # cannot be decided from the length; the common case skips the vocabulary scan
        return
    fewest = chars // instance.model.longest_token_bytes
    if fewest > n_ctx:  # at the boundary, tokenizing gives the exact count
        raise ContextOverflow(fewest, n_ctx, param=param, at_least=True)
