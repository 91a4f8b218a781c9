"""Unguessable identifiers and API tokens, from one read of the OS's random source each.

`secrets.choice` reads the random source once per character (a getrandom system call each), and the
server makes ids on every request: a completion id, a streamed response's item ids, tool call ids.
"""

from __future__ import annotations

import secrets
import string

ALPHANUMERIC = string.ascii_letters + string.digits


def random_string(alphabet: str, length: int) -> str:
    """`length` characters drawn uniformly from `alphabet` (at most 256 characters)."""
    size = len(alphabet)
    # Bytes at or above `limit` are dropped: with them, `b % size` would favour the alphabet's first characters.
    limit = 256 - 256 % size
    chars: list[str] = []
    while len(chars) < length:
        chars += [alphabet[b % size] for b in secrets.token_bytes(length + length // 2) if b < limit]
    return "".join(chars[:length])


def new_token() -> str:
    """A fresh API token in LM Studio's shape: sk-lm-<8 alphanumerics>:<20 alphanumerics>."""
    return f"sk-lm-{random_string(ALPHANUMERIC, 8)}:{random_string(ALPHANUMERIC, 20)}"
