"""Per-instance counters behind /metrics (llama.cpp server's names) and the queue's Retry-After hint.

The engine thread is the only writer: plain attribute updates once per decode call or per finished
request, no locks. Readers (the /metrics handler) may see a value one step old, which a scrape tolerates.
The object outlives its engine (the manager keeps one per instance id) so counters stay monotonic
across an unload and reload under the same id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class EngineStats:
    prompt_tokens: int = 0  # prompt tokens evaluated (a reused cached prefix is not evaluated)
    prompt_seconds: float = 0.0  # summed per request: slot assigned -> first token (or the end)
    predicted_tokens: int = 0  # generated tokens, as the usage's completion_tokens counts them
    predicted_seconds: float = 0.0  # summed per request: first token -> last token
    decode_calls: int = 0
    busy_slots: int = 0  # summed over decode calls: divided by decode_calls, the mean batch of requests
    n_tokens_max: int = 0  # the longest sequence (prompt + generated) seen
    requests_finished: int = 0
    rejected: int = 0  # submits refused with QueueFull (written by the submitting event loop, not the engine)
    # Speculative decoding: drafted tokens put to the model, by outcome, added when a drafted request ends.
    draft_accepted: int = 0
    draft_rejected: int = 0
    draft_ignored: int = 0
    images_evaluated: int = 0  # images encoded (a cached image is not)
    image_encode_seconds: float = 0.0  # their encodes, on a thread of their own (other streams keep going)
    image_seconds: float = 0.0  # engine-thread time on their rows, during which no other stream advanced

    def finished(self, prompt_tokens: int, prompt_seconds: float, predicted_tokens: int,
                 predicted_seconds: float, sequence_length: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.prompt_seconds += prompt_seconds
        self.predicted_tokens += predicted_tokens
        self.predicted_seconds += predicted_seconds
        self.requests_finished += 1
        if sequence_length > self.n_tokens_max:
            self.n_tokens_max = sequence_length

    def drafted(self, accepted: int, rejected: int, ignored: int) -> None:
        self.draft_accepted += accepted
        self.draft_rejected += rejected
        self.draft_ignored += ignored

    def retry_after(self, parallel: int) -> int:
        """Whole seconds until a queue place is likely to free: the mean time a request holds a slot,
        over the slots (one of them frees about that often); 1 before any request has finished."""
        if self.requests_finished == 0:
            return 1
        mean = (self.prompt_seconds + self.predicted_seconds) / self.requests_finished
        return min(60, max(1, math.ceil(mean / max(1, parallel))))
