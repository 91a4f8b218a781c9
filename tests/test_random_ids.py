"""Ids and tokens from lmkube.random_ids: shape, alphabet and an even spread of characters."""

from __future__ import annotations

import collections
import re

from lmkube.random_ids import ALPHANUMERIC, new_token, random_string


def test_random_string_has_the_length_and_alphabet_asked_for() -> None:
    for alphabet, length in (("ab", 1), ("abc", 7), (ALPHANUMERIC, 21), (ALPHANUMERIC, 300)):
        drawn = random_string(alphabet, length)
        assert len(drawn) == length and set(drawn) <= set(alphabet)


def test_every_character_is_about_equally_likely() -> None:
    # 36 does not divide 256: taking `byte % 36` of every byte would make 0-3 ('a'-'d') 8/7 as likely as the rest.
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    counts = collections.Counter(random_string(alphabet, 360_000))
    expected = 10_000
    assert set(counts) == set(alphabet)
    assert all(abs(n - expected) < 500 for n in counts.values()), counts  # > 5 standard deviations


def test_tokens_have_lm_studios_shape_and_do_not_repeat() -> None:
    tokens = {new_token() for _ in range(1000)}
    assert len(tokens) == 1000
    assert all(re.fullmatch(r"sk-lm-[A-Za-z0-9]{8}:[A-Za-z0-9]{20}", t) for t in tokens)
