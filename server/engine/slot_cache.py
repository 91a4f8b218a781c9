"""The slots of a generation engine and what each one holds in the shared KV cache.

All reuse of computed prompts lives here: a slot keeps its cache after its request ends, a new request
takes the free slot whose cache shares most with its prompt, takes the longest shared run any other
sequence holds (the unified KV cache lets sequences share cells, so that is free), waits a step for a
prompt in the same batch that is computing their common prefix, and brings back idle caches parked in
host memory. Only the engine thread calls in here.
"""

from __future__ import annotations

import time

from . import llama_lib as lib
from .host_cache import CachedPrompt, HostPromptCache
from .prefixes import common_prefix
from .slot import GenerationRequest, Slot

# A prompt waits one step for another one to compute their common prefix only if it saves this many tokens.
WORTH_WAITING_FOR = 16


class SlotCaches:
    def __init__(self, context: lib.LlamaContext, host_cache_bytes: int = 0) -> None:
        self.context = context
        self.slots = [Slot(seq=i, cached=[]) for i in range(context.config.n_seq_max)]
        # Sequences share cells only in a plain attention cache: recurrent state cannot be split at a
        # position, and a sliding window may have dropped part of a prefix.
        self.shares = not (context.model.keeps_state or context.model.windowed)
        # None keeps idle caches in the KV cache (see host_cache.py for what that costs).
        self.host = HostPromptCache(host_cache_bytes) if host_cache_bytes > 0 else None

    @property
    def kv_tokens(self) -> int:
        """Cells holding KV, idle slots' reusable prefixes included; a prefix several sequences share counts once
        (sharing is how equal prefixes get there, so each shared run is one set of cells)."""
        return _distinct_cells([list(c) for s in self.slots if (c := s.cached)])

    @property
    def kv_tokens_in_use(self) -> int:
        """Cells the running requests hold (shared prefixes once). Idle slots' caches are left out: they are
        dropped as soon as a request needs their room, as vLLM counts its evictable prefix-cache blocks free."""
        return _distinct_cells([list(c) for s in self.slots if (c := s.cached) and s.request is not None])

    @property
    def host_budget_bytes(self) -> int:
        return self.host.budget_bytes if self.host is not None else 0

    @property
    def host_tokens(self) -> int:
        return self.host.tokens if self.host is not None else 0

    @property
    def prompt_tokens_ahead(self) -> int:
        """Prompt tokens the running requests have yet to compute (before any sharing)."""
        return sum(len(s.request.prompt) - s.prompt_pos for s in self.slots if s.request is not None and s.prefilling)

    def best_slot(self, free: list[Slot], prompt: list[int]) -> Slot:
        def reuse(slot: Slot) -> tuple[int, float]:
            return (common_prefix(slot.cached or [], prompt), -slot.last_used)

        return max(free, key=reuse)

    def take_for(self, slot: Slot, request: GenerationRequest) -> None:
        """Gives `slot` to `request`, keeping as much of the prompt's KV as it (or host memory) holds."""
        prompt = request.prompt
        keep = min(common_prefix(slot.cached or [], prompt), len(prompt) - 1)
        if self.host is not None:
            keep = self._restore_from_host(slot, prompt, keep)
        cached = slot.cached or []
        if keep < len(cached) and not self.context.seq_remove(slot.seq, keep, -1):
            # Recurrent and sliding-window caches cannot drop a suffix; start the sequence over.
            self.context.seq_remove(slot.seq)
            keep = 0
        slot.request = request
        slot.cached = cached[:keep]
        slot.cached_at_start = keep
        slot.prompt_pos = keep
        slot.pending = -1
        slot.generated = 0
        slot.started_at = time.perf_counter()
        slot.first_token_at = 0.0
        self._borrow(slot)  # now, while idle caches are still in the KV cache

    def share_prefix(self, slot: Slot) -> bool:
        """Takes the longest run of this prompt that another sequence already holds; True when a prompt
        ahead of it in this very batch is computing more of their common prefix, so this one waits a step
        and takes that too instead of computing it twice (concurrent requests behind one system prompt)."""
        self._borrow(slot)
        if not self.shares:
            return False
        assert slot.request is not None
        prompt = slot.request.prompt
        last = len(prompt) - 1
        for other in self.slots:
            if other.chunk_end < 0 or other is slot:
                continue
            assert other.request is not None
            computing = min(common_prefix(other.request.prompt[: other.chunk_end], prompt), last)
            if computing - slot.prompt_pos >= WORTH_WAITING_FOR:
                return True
        return False

    def _borrow(self, slot: Slot) -> None:
        """Extends the slot's prompt with the longest run of it another sequence holds (no compute, no copy)."""
        assert slot.request is not None and slot.cached is not None
        prompt = slot.request.prompt
        donor, reach = self._longest_held_elsewhere(slot, prompt, slot.prompt_pos)
        if donor is not None:
            self.context.seq_copy(donor.seq, slot.seq, slot.prompt_pos, reach)
            slot.cached.extend(prompt[slot.prompt_pos : reach])
            slot.cached_at_start += reach - slot.prompt_pos
            slot.prompt_pos = reach

    def _longest_held_elsewhere(self, slot: Slot, prompt: list[int], beyond: int) -> tuple[Slot | None, int]:
        """The other sequence holding the longest run of `prompt` that `slot` could take (longer than
        `beyond`), and that run's length; (None, beyond) when none does or sequences cannot share."""
        donor, reach = None, beyond
        if not self.shares:
            return donor, reach
        last = len(prompt) - 1  # the last prompt token is always decoded here: its logits start the reply
        for other in self.slots:
            if other is not slot and other.cached and len(other.cached) > reach:
                shared = min(common_prefix(other.cached, prompt), last)
                if shared > reach:
                    donor, reach = other, shared
        return donor, reach

    def offload_idle(self) -> None:
        """Moves idle slots' caches to host memory while requests run, which keeps their attention span short.
        New requests have taken what they reuse from idle caches by then (`take_for`)."""
        if self.host is None or all(s.request is None for s in self.slots):
            return
        for slot in self.slots:
            if slot.request is None and slot.cached:
                self._save(slot)
                self.forget(slot)

    def drop_idle(self) -> bool:
        """Frees the cells of every idle cache (the KV cache is full); True if there were any."""
        dropped = False
        for slot in self.slots:
            if slot.request is None and slot.cached:
                self.forget(slot)
                dropped = True
        return dropped

    def forget(self, slot: Slot) -> None:
        self.context.seq_remove(slot.seq)
        slot.cached = []

    def close(self) -> None:
        if self.host is not None:
            self.host.clear()

    def _restore_from_host(self, slot: Slot, prompt: list[int], keep: int) -> int:
        """Brings back the host entry sharing the most with `prompt` if it beats what the KV cache holds;
        returns how much of the prompt the slot then holds."""
        assert self.host is not None and slot.cached is not None
        _, in_cache = self._longest_held_elsewhere(slot, prompt, keep)  # what `_borrow` will take instead
        found = self.host.take_longest(prompt, in_cache, limit=len(prompt) - 1)
        if found is None:
            if keep < len(slot.cached) // 2:
                # Another conversation takes this slot: keep the old one for its next turn. (Not when a
                # continuation trims a few tokens: saving costs ~5 µs per cell, in this request's TTFT.)
                self._save(slot)
            return keep
        entry, shared = found
        self._save(slot)
        self.forget(slot)
        if not self.context.restore_sequence(entry.state, slot.seq):  # no contiguous room for it now
            self.context.seq_remove(slot.seq)
            self.host.put(entry)
            return 0
        slot.cached = entry.tokens
        return shared

    def _save(self, slot: Slot) -> None:
        assert self.host is not None and slot.cached is not None
        # Sized first: a long context's cache can be gigabytes, more than the whole budget.
        if self.host.wants(slot.cached) and self.context.sequence_state_size(slot.seq) <= self.host.budget_bytes:
            self.host.put(CachedPrompt(list(slot.cached), self.context.save_sequence(slot.seq)))


def _distinct_cells(caches: list[list[int]]) -> int:
    """Cells holding the sequences `caches`, counting a prefix that several of them share once."""
    caches.sort()
    return sum(len(c) - common_prefix(c, previous) for previous, c in zip([[], *caches], caches, strict=False))
