"""Speculative decoding: a small draft model proposes tokens, the target model verifies them in its batch.

The scheme is llama.cpp's (common/speculative.cpp, the server's per-slot drafts): the draft model runs
in its own llama_context, owned by the engine thread like the target's, with one sequence per target
slot (same sequence ids). Each step, for every generating slot that has a draft, the draft context is
brought up to the slot's tokens and proposes up to `max_tokens` tokens greedily, stopping early when its
top token's probability falls under `p_min`. The target decodes the slot's pending token plus the drafted
ones in the same batch as every other slot, with logits for each; the engine then samples the target at
each position with the request's own sampler chain and keeps drafted tokens while the target's sampled
token equals the drafted one, plus the one token the target sampled after the last match. Rejected
positions are removed from the target's KV cache; the draft cache is reconciled lazily next time.

Because every emitted token is the target's own sample given exactly the tokens before it (drawn once per
emitted token, in order), the output is the same as without a draft: greedy byte for byte (up to the
batch-shape sensitivity of llama.cpp's kernels), and sampled requests keep the target's distribution and
even its seeded random stream. A sampled request accepts a drafted token only when the target's sampled
token equals it (no rejection sampling against the draft's probabilities), so its acceptance rate is
lower than a greedy request's.

A draft that does not help backs off: after three rounds in a row that drafted nothing (the draft was
never sure enough) or had nothing accepted, the slot skips drafting for 2, then 4, ... up to 32 steps,
and the draft cache catches up with the skipped tokens in one batch when drafting resumes. Without that,
a draft model that never agrees (or is never confident) costs a draft decode every step for nothing:
2.5x slower measured on the 2-core box with a random-weight pair.

Counts (LM Studio's stats): `total` drafted tokens put to the target, `accepted` those the target agreed
with, `rejected` the first one it disagreed with in a round, `ignored` = total - accepted - rejected (the
tokens after a rejection, or past the point where the generation ended).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import llama_lib as lib
from .prefixes import common_prefix

log = logging.getLogger(__name__)

MAX_BACKOFF_STEPS = 32
FREE_MISSES = 2  # fruitless rounds in a row that cost no skipped steps yet (a good draft has some too)
DRAFT_TOP_K = 10

# llama.cpp's compatibility rules (common_speculative_are_compatible).
VOCAB_MAX_SIZE_DIFFERENCE = 128
VOCAB_CHECK_START_TOKEN_ID = 5


@dataclass(frozen=True, slots=True)
class DraftSettings:
    max_tokens: int = 8  # drafted tokens per step and slot at most
    min_tokens: int = 0  # a shorter draft is not worth a verification: drop it
    p_min: float = 0.75  # stop drafting once the draft's top token is less likely than this (llama.cpp's default)


class DraftIncompatible(ValueError):
    pass


def check_compatible(target: lib.LlamaModel, draft: lib.LlamaModel, draft_name: str) -> None:
    """Raises DraftIncompatible unless `draft`'s tokens mean the same as `target`'s (llama.cpp's checks)."""
    def fail(reason: str) -> None:
        raise DraftIncompatible(f"Draft model \"{draft_name}\" cannot draft for this model: {reason}.")

    if target.keeps_state:
        fail("the model is recurrent or hybrid, so rejected draft tokens cannot be removed from its cache")
    if target.vocab_type != draft.vocab_type:
        fail("the tokenizer types differ")
    if (target.add_bos, target.add_eos, target.bos_id, target.eos_id) != (
            draft.add_bos, draft.add_eos, draft.bos_id, draft.eos_id):
        fail("the special tokens (BOS/EOS) differ")
    if abs(target.n_vocab - draft.n_vocab) > VOCAB_MAX_SIZE_DIFFERENCE:
        fail(f"the vocabulary sizes differ too much ({target.n_vocab} vs {draft.n_vocab} tokens)")
    for token in range(VOCAB_CHECK_START_TOKEN_ID, min(target.n_vocab, draft.n_vocab)):
        if target.token_text(token) != draft.token_text(token):
            fail(f"token {token} differs ({target.token_text(token)!r} vs {draft.token_text(token)!r})")


@dataclass(eq=False, slots=True)
class DraftJob:
    """One slot's drafting this step: its tokens so far (the last one not yet in any cache)."""

    seq: int
    history: list[int]
    limit: int
    settings: DraftSettings
    tokens: list[int] = field(default_factory=list)
    pos: int = 0  # next history position to decode into the draft cache
    candidate: int = -1
    probability: float = 0.0
    index: int = -1


class Drafter:
    """A draft model and its context, mirroring the target's sequences. Engine thread only, after loading."""

    def __init__(self, name: str, model: lib.LlamaModel, context: lib.LlamaContext, target_vocab: int) -> None:
        self.name = name
        self.model = model
        self.context = context
        self.target_vocab = target_vocab
        self.cached: list[list[int]] = [[] for _ in range(context.config.n_seq_max)]
        self._eog = model.eog_ids

    def close(self) -> None:
        self.context.close()
        self.model.close()

    def _reset(self) -> None:
        self.context.clear()
        self.cached = [[] for _ in self.cached]

    def _pick(self, job: DraftJob, batch_index: int) -> None:
        logits = self.context.logits(batch_index, self.model.n_vocab)
        best = int(logits.argmax())
        job.candidate = best
        # llama.cpp's draft sampler keeps the top 10 and takes the softmax over them: p_min means the same here.
        top = np.partition(logits, -DRAFT_TOP_K)[-DRAFT_TOP_K:]
        job.probability = float(1.0 / np.exp(top - logits[best]).sum())

    def draft(self, jobs: list[DraftJob]) -> None:
        """Fills each job's `tokens` with its draft (possibly empty)."""
        if not self._catch_up(jobs):
            return
        live = [j for j in jobs if j.candidate >= 0]
        batch = self.context.batch
        while live:
            batch.clear()
            still: list[DraftJob] = []
            for job in live:
                token = job.candidate
                if job.probability < job.settings.p_min or token >= self.target_vocab:
                    continue
                job.tokens.append(token)
                if len(job.tokens) >= job.limit or token in self._eog or batch.free == 0:
                    continue
                job.index = batch.add(token, len(job.history) + len(job.tokens) - 1, job.seq, True)
                still.append(job)
            if not still:
                break
            if self.context.decode() != 0:
                self._reset()  # draft cache full: start its sequences over; the drafts so far still stand
                break
            for job in still:
                self.cached[job.seq].append(job.tokens[-1])
                self._pick(job, job.index)
            live = still
        for job in jobs:
            if len(job.tokens) < job.settings.min_tokens:
                job.tokens = []

    def _catch_up(self, jobs: list[DraftJob]) -> bool:
        """Brings each job's draft sequence to its history and picks the first candidate."""
        for job in jobs:
            cached = self.cached[job.seq]
            keep = min(common_prefix(cached, job.history), len(job.history) - 1)
            if keep < len(cached):
                if not self.context.seq_remove(job.seq, keep, -1):
                    self.context.seq_remove(job.seq)
                    keep = 0
                del cached[keep:]
            job.pos = keep
        batch = self.context.batch
        todo = list(jobs)
        while todo:
            batch.clear()
            finishing: list[DraftJob] = []
            for job in todo:
                history = job.history
                last = len(history) - 1
                while job.pos <= last and batch.free:
                    index = batch.add(history[job.pos], job.pos, job.seq, job.pos == last)
                    job.pos += 1
                if job.pos > last and job.index < 0:
                    job.index = index
                    finishing.append(job)
            if self.context.decode() != 0:
                self._reset()
                return False
            for job in todo:
                self.cached[job.seq] = job.history[: job.pos]
            for job in finishing:
                self._pick(job, job.index)
            todo = [j for j in todo if j.pos < len(j.history)]
        return True


@dataclass(frozen=True, slots=True)
class Draft:
    """What a request asks for: a drafter and how hard to draft."""

    drafter: Drafter
    settings: DraftSettings


@dataclass(eq=False, slots=True)
class Speculation:
    """A running request's drafting state and counts."""

    draft: Draft
    tokens: list[int] = field(default_factory=list)  # drafted and in (or going into) the current batch
    total: int = 0
    accepted: int = 0
    rejected: int = 0
    misses: int = 0  # rounds in a row that drafted nothing or had nothing accepted
    skip: int = 0  # steps left without drafting

    def missed(self) -> None:
        self.misses += 1
        if self.misses > FREE_MISSES:
            self.skip = min(1 << (self.misses - FREE_MISSES), MAX_BACKOFF_STEPS)

    def verified(self, accepted: int) -> None:
        if accepted:
            self.misses = 0
        else:
            self.missed()

    def finish_fields(self) -> dict[str, Any]:
        return {"draft_model": self.draft.drafter.name, "draft_total": self.total,
                "draft_accepted": self.accepted, "draft_rejected": self.rejected}


def load_drafter(name: str, path: Path, target: lib.LlamaModel, config: lib.ContextConfig,
                 n_gpu_layers: int) -> Drafter:
    model = lib.LlamaModel(path, n_gpu_layers=n_gpu_layers)
    try:
        check_compatible(target, model, name)
        context = lib.LlamaContext(model, config)
    except BaseException:
        model.close()
        raise
    return Drafter(name, model, context, target.n_vocab)


class DraftPool:
    """The drafters one instance has loaded, by model key; loaded once, closed with the instance."""

    def __init__(self) -> None:
        self._drafters: dict[str, Drafter] = {}
        self._lock = threading.Lock()

    def get(self, key: str, load: Callable[[], Drafter]) -> Drafter:
        with self._lock:
            drafter = self._drafters.get(key)
            if drafter is None:
                drafter = self._drafters[key] = load()
            return drafter

    def close(self) -> None:
        with self._lock:
            for drafter in self._drafters.values():
                drafter.close()
            self._drafters.clear()

