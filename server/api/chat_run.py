"""The chat run every API family shares: request → `ChatSpec` → rounds of generation → deltas or a result.

A family converts its request into a `ChatSpec` and a `Sampling` (its sampling fields), and encodes what
comes back (`Round.deltas` for streams, `Round.complete` for plain responses); everything between is here:

    run = await ChatRun.open(manager, body.model, ttl=body.ttl, sampling=..., header_tool_choice=...)
    with run.instance.in_use():
        round = await run.submit(spec)  # prepare_chat off the loop → params, grammar → draft → submit
    async for deltas in round.deltas(): ...  # ChatDeltas per engine batch; `round.finish` at the end
    finish = await round.complete()          # or: run to the end, `round.result` parsed

`/v1/completions` (no chat template) submits tokens with `submit_tokens` and reads `Round.texts`. The MCP
tool loop of `/api/v1/chat` and `/v1/responses` (api/tool_loop.py) runs its rounds through one ChatRun.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from ..chat.deltas import ChatDelta, ChatResult
from ..chat.session import ChatOutput, ChatSpec, PreparedChat, prepare_chat, with_header_tool_choice
from ..engine.events import Finish, PromptProgress, TextDelta
from ..engine.llama_lib import ModelLoadError
from ..engine.sampling import SamplingParams
from ..engine.slot import GenerationRequest
from ..errors import APIError
from ..runtime.instance import ModelInstance
from ..runtime.manager import ModelManager
from ..runtime.progress import Listener
from ..store.model_store import ModelNotFound
from . import inference

# A round's sampling parameters from its instance (`n_vocab` bounds logit_bias); called once per round.
Sampling = Callable[[ModelInstance], SamplingParams]


def generation_failed(finish: Finish) -> APIError:
    return APIError(500, f"Generation failed: {finish.error}", type="server_error")


@dataclass(slots=True)
class Round:
    """One prompt submitted to the instance, and what its generation has produced so far."""

    instance: ModelInstance
    params: SamplingParams
    generation: GenerationRequest
    prepared: PreparedChat | None = None  # None for raw-text completions
    output: ChatOutput | None = field(init=False)
    finish: Finish | None = None  # set once the generation has ended
    prefill: float = 0.0  # the share of the prompt computed so far (with ChatRun.report_prefill)

    def __post_init__(self) -> None:
        self.output = self.prepared.new_output() if self.prepared is not None else None

    @property
    def result(self) -> ChatResult:
        assert self.output is not None
        return self.output.result

    def cancel(self) -> None:
        """Frees the request's slot; harmless once it has finished."""
        self.generation.cancel()

    async def texts(self) -> AsyncIterator[list[str]]:
        """The raw generated text, a list of pieces per engine batch, the last one setting `finish`; a failed
        generation raises APIError after what came before it in its batch. A batch of prompt progress alone
        (`prefill` moved) is an empty list."""
        try:
            async for batch in self.generation:
                pieces: list[str] = []
                for event in batch:
                    if isinstance(event, TextDelta):
                        pieces.append(event.text)
                    elif isinstance(event, PromptProgress):
                        self.prefill = event.fraction
                    elif event.reason == "error":
                        if pieces:
                            yield pieces
                        raise generation_failed(event)
                    else:
                        self.finish = event
                yield pieces
        finally:
            self.generation.cancel()

    async def deltas(self) -> AsyncIterator[list[ChatDelta]]:
        """The chat layer's deltas, a list per engine batch, the last one closing the output (and setting
        `finish`); a failed generation raises APIError after what came before it in its batch."""
        output = self.output
        assert output is not None
        async for pieces in self.texts():
            deltas = [output.feed(text) for text in pieces]
            if self.finish is not None:
                deltas.append(output.finish())
            yield deltas

    async def complete(self) -> Finish:
        """Runs the generation to the end in one piece (no deltas): the finish, with `result` parsed."""
        text, finish = await inference.collect(self.generation)
        if self.output is not None:
            self.output.feed(text)
            self.output.finish()
        self.finish = finish
        return finish

    async def text(self) -> tuple[str, Finish]:
        """Runs a raw-text generation to the end: its text and finish."""
        text, self.finish = await inference.collect(self.generation)
        return text, self.finish


class ChatRun:
    """One request's model instance and the rounds it submits to it.

    `sampling` gives each round's parameters; `param` names the request field of the prompt in errors;
    `header_tool_choice` (the lmkube-tool-choice header) applies to the first round only; `rename` rewrites
    the chat layer's errors into the family's field names."""

    def __init__(self, instance: ModelInstance, sampling: Sampling, *, param: str = "messages",
                 header_tool_choice: str | None = None,
                 rename: Callable[[APIError], APIError] | None = None, fetch_image_urls: bool = False) -> None:
        self.instance = instance
        self.fetch_image_urls = fetch_image_urls
        self.sampling = sampling
        self.param = param
        self.header_tool_choice = header_tool_choice
        self.rename = rename
        self.rounds: list[Round] = []
        self.report_prefill = False  # rounds get the prompt's progress (`Round.prefill`) as it is computed

    @classmethod
    async def open(cls, manager: ModelManager, model: str, *, ttl: float | None, sampling: Sampling,
                   context_length: int | None = None, param: str = "messages",
                   header_tool_choice: str | None = None,
                   rename: Callable[[APIError], APIError] | None = None,
                   on_load_progress: Listener | None = None) -> ChatRun:
        """Finds (or JIT-loads) the model; 404 for an unknown one, 400 for an embedding model.
        `on_load_progress` hears a JIT load's progress (0..1, on the event loop)."""
        try:
            if context_length is None:
                instance = await inference.acquire(manager, model, ttl=ttl, kind="llm", on_progress=on_load_progress)
            else:  # a load with its own context length: the caller checked the model's kind beforehand
                instance = await manager.acquire(model, ttl=ttl, context_length=context_length,
                                                 on_progress=on_load_progress)
        except ModelNotFound as exc:
            raise inference.model_not_found(exc) from None
        except ModelLoadError as exc:  # a JIT load llama.cpp refused (a damaged file, an unknown architecture)
            raise APIError(422, str(exc), param="model", code="model_load_failed") from None
        return cls(instance, sampling, param=param, header_tool_choice=header_tool_choice, rename=rename,
                   fetch_image_urls=manager.settings.fetch_image_urls)

    async def prepare(self, spec: ChatSpec) -> PreparedChat:
        """The spec templated and tokenized, off the event loop (a long conversation takes seconds)."""
        if not self.rounds:
            spec = with_header_tool_choice(spec, self.header_tool_choice)
        try:
            return await asyncio.to_thread(prepare_chat, self.instance, spec, param=self.param,
                                           fetch_image_urls=self.fetch_image_urls)
        except APIError as exc:
            raise (self.rename(exc) if self.rename is not None else exc) from None

    async def submit(self, spec: ChatSpec) -> Round:
        """Prepares the spec and submits it as the next round. Hold `instance.in_use()` around this and
        start reading the round before the next await, so that nothing unloads the model in between."""
        prepared = await self.prepare(spec)
        params = self.sampling(self.instance)
        params.grammar = prepared.grammar
        params.render_special = prepared.render_special
        return await self._submit(prepared.prompt, params, prepared)

    async def submit_tokens(self, tokens: Sequence[int]) -> Round:
        """Submits a prompt of tokens as is (text completions: no chat template, no grammar)."""
        return await self._submit(tokens, self.sampling(self.instance), None)

    async def _submit(self, prompt: Sequence[int], params: SamplingParams, prepared: PreparedChat | None) -> Round:
        await inference.load_draft(self.instance, params)
        images = prepared.images if prepared is not None else None
        generation = inference.submit(self.instance, prompt, params, param=self.param, images=images,
                                      report_prefill=self.report_prefill)
        round = Round(self.instance, params, generation, prepared)
        self.rounds.append(round)
        return round

    def cancel(self) -> None:
        """Cancels every round's generation (those that ended are untouched)."""
        for round in self.rounds:
            round.cancel()
