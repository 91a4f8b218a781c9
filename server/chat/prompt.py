"""Turns chat messages into prompt tokens with the model's own template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import APIError
from ..runtime.instance import ModelInstance
from .template import ChatTemplateError
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


def prompt_tokens(instance: ModelInstance, text: str) -> list[int]:
    """Tokenizes rendered chat text; templates that already start with BOS do not get a second one."""
    model = instance.model
    bos = instance.template.bos_token
    add_bos = model.add_bos and not (bos and text.startswith(bos))
    tokens = model.tokenize(text, add_special=False, parse_special=True)
    return [model.bos_id, *tokens] if add_bos and model.bos_id >= 0 else tokens
