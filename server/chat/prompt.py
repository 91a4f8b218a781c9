"""Turns chat messages into prompt tokens with the model's own template."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..engine.llama_lib import TooManyTokens
from ..engine.vision import Image, ImageTokenizeError, PromptImages
from ..errors import APIError, ContextOverflow
from ..runtime.chat_template import ChatTemplateError
from ..runtime.instance import ModelInstance
from .images import part_url
from .tool_prompt import fold_late_system, has_late_system

# Where an image sits in rendered text until the projector's own marker replaces it (no template alters it).
IMAGE_MARKER = "<__lmkube_image__>"


def _flatten_content(content: Any, images: list[Any] | None) -> Any:
    """Text parts become one string: most templates expect `content` to be a string. Image parts become
    IMAGE_MARKER, their URLs appended to `images` (None: images are refused)."""
    if not isinstance(content, list):
        return content
    texts: list[str] = []
    for part in content:
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text"):
            texts.append(str(part.get("text", "")).replace(IMAGE_MARKER, ""))
        elif kind == "image_url" and images is not None:
            images.append(part_url(part))
            texts.append(IMAGE_MARKER)
        elif kind in ("image_url", "input_image", "image"):
            raise APIError(400, "This model does not support images (it has no vision projector).",
                           param="messages", code="model_not_vision_capable")
        else:
            raise APIError(400, f"Unsupported content part type {kind!r}.", param="messages")
    return "".join(texts)


def normalize_messages(messages: Sequence[Mapping[str, Any]], images: list[Any] | None = None) -> list[dict[str, Any]]:
    """Messages as templates expect them; image URLs go to `images` in order (None: images are refused)."""
    normalized = []
    for message in messages:
        item = {k: v for k, v in message.items() if v is not None}
        item["content"] = _flatten_content(item.get("content"), images) or ""
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
    add_bos = _adds_bos(instance, text)
    n_ctx = instance.context_length
    try:
        tokens = model.tokenize(text, add_special=False, parse_special=True, limit=n_ctx - 1 - add_bos)
    except TooManyTokens as exc:
        raise ContextOverflow(exc.count + add_bos, n_ctx, param=param) from None
    return [model.bos_id, *tokens] if add_bos else tokens


def _adds_bos(instance: ModelInstance, text: str) -> bool:
    model = instance.model
    bos = instance.template.bos_token
    return model.add_bos and not (bos and text.startswith(bos)) and model.bos_id >= 0


def prompt_with_images(instance: ModelInstance, text: str, images: list[Image], *,
                       param: str = "messages") -> tuple[list[int], PromptImages]:
    """Tokenizes rendered chat text holding IMAGE_MARKER once per image, through the model's projector: the
    tokens (each image a run of placeholders) and the image chunks behind them."""
    projector = instance.projector
    assert projector is not None
    try:
        # The projector's own marker typed into a message would count as one more image: it goes.
        marked = text.replace(projector.marker, "").replace(IMAGE_MARKER, projector.marker)
        tokens, chunks = projector.tokenize(marked, images, add_bos=_adds_bos(instance, text))
    except ImageTokenizeError as exc:
        raise APIError(400, str(exc), param=param, code="invalid_image") from None
    if len(tokens) >= instance.context_length:
        raise ContextOverflow(len(tokens), instance.context_length, param=param)
    return tokens, chunks


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
