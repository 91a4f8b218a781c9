"""TextStream: UTF-8 reassembly across token boundaries and stop strings, without a model."""

from __future__ import annotations

import itertools
import random

import pytest
from lmkube.server.engine.text_stream import TextStream

# One character of each UTF-8 length: 2, 3 and 4 bytes.
MULTIBYTE = ["é", "€", "😀"]


def feed(stream: TextStream, pieces: list[bytes]) -> list[str]:
    return [stream.push(piece) for piece in pieces]


def splits(data: bytes, cuts: tuple[int, ...]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("stops", [(), ("STOP",)], ids=["no-stops", "with-stops"])
@pytest.mark.parametrize("char", MULTIBYTE, ids=["2-byte", "3-byte", "4-byte"])
def test_multibyte_char_fed_byte_by_byte_is_held_until_complete(char: str, stops: tuple[str, ...]) -> None:
    data = char.encode()
    assert len(data) == MULTIBYTE.index(char) + 2
    stream = TextStream(stops)
    out = feed(stream, [bytes([b]) for b in data])
    assert out == [""] * (len(data) - 1) + [char]
    assert stream.finish() == ""
    assert stream.stopped_by is None


@pytest.mark.parametrize("stops", [(), ("STOP",)], ids=["no-stops", "with-stops"])
@pytest.mark.parametrize("char", MULTIBYTE, ids=["2-byte", "3-byte", "4-byte"])
def test_multibyte_char_split_at_every_boundary(char: str, stops: tuple[str, ...]) -> None:
    data = b"a" + char.encode() + b"b"
    first_inner, after = 1, 1 + len(char.encode())
    for cut in range(1, len(data)):
        stream = TextStream(stops)
        head, tail = feed(stream, splits(data, (cut,)))
        # The first push may only return whole characters: "a" alone while the char is incomplete.
        assert head == ("a" if first_inner <= cut < after else data[:cut].decode()), cut
        assert head + tail + stream.finish() == "a" + char + "b", cut


@pytest.mark.parametrize("char", MULTIBYTE, ids=["2-byte", "3-byte", "4-byte"])
def test_every_way_of_cutting_a_char_into_three_pieces(char: str) -> None:
    data = char.encode()
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            stream = TextStream()
            out = feed(stream, splits(data, (i, j)))
            # Nothing is emitted before the last byte arrives, then exactly the character.
            assert "".join(out) == char and all(o in ("", char) for o in out)
            assert out.index(char) == (2 if j < len(data) else 1 if i < len(data) else 0)
            assert stream.finish() == ""


def test_invalid_bytes_become_replacement_characters_without_raising() -> None:
    stream = TextStream()
    assert stream.push(b"\xff") == "\ufffd"  # never valid in UTF-8
    assert stream.push(b"a\x80b") == "a\ufffdb"  # stray continuation byte
    assert stream.push(b"\xe2\x82") == ""  # could still become "€": held
    assert stream.push(b"x") == "\ufffdx"  # ...but did not
    assert stream.push(b"\xf0\x9f") == ""
    assert stream.finish() == "\ufffd"  # a truncated character at the end is flushed as U+FFFD


def test_invalid_bytes_with_stop_strings() -> None:
    stream = TextStream(["END"])
    assert stream.push(b"\xc3") == ""
    assert stream.push(b"E") == "\ufffd"  # the lead byte is dead; "E" may start "END"
    assert stream.push(b"\xffN") == "E\ufffdN"
    assert stream.push(b"EN") == ""
    assert stream.push(b"D\xe2\x82\xac tail") == ""
    assert stream.stopped_by == "END"
    assert stream.finish() == ""


def test_random_bytes_in_random_pieces_match_one_shot_decoding() -> None:
    rng = random.Random(1234)
    alphabet = [b"a", b"b", b" ", "é".encode(), "€".encode(), "😀".encode(), b"\xff", b"\x80", b"\xe2\x82", b"\xf0"]
    for _ in range(300):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        cuts = tuple(sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 12))))) if data else ()
        stream = TextStream()
        out = feed(stream, splits(data, cuts))
        assert "".join(out) + stream.finish() == data.decode("utf-8", "replace")
        for piece in out:
            piece.encode("utf-8")  # no lone surrogates in any delta


def test_stop_string_split_across_pushes() -> None:
    stream = TextStream(["STOP"])
    assert stream.push(b"abc ST") == "abc "
    assert stream.stopped_by is None
    assert stream.push(b"O") == ""
    assert stream.push(b"P tail") == ""
    assert stream.stopped_by == "STOP"
    assert stream.finish() == ""


def test_stop_string_fed_one_byte_at_a_time() -> None:
    stream = TextStream(["<|end|>"])
    out = feed(stream, [bytes([b]) for b in b"hi <|end|> more"])
    assert "".join(out) == "hi "
    assert stream.stopped_by == "<|end|>"
    assert stream.finish() == ""


def test_multibyte_stop_string_split_inside_a_character() -> None:
    stream = TextStream(["ünd"])
    data = "Grund ünd mehr".encode()
    out = feed(stream, [bytes([b]) for b in data])
    assert "".join(out) == "Grund "
    assert stream.stopped_by == "ünd"
    assert stream.finish() == ""


def test_partial_stop_prefix_is_held_then_released() -> None:
    stream = TextStream(["STOP"])
    assert stream.push(b"hello S") == "hello "
    assert stream.push(b"T") == ""
    assert stream.push(b"x") == "STx"  # "STx" can no longer become "STOP"
    assert stream.push(b" STO") == " "
    assert stream.push(b"O") == "STOO"
    assert stream.stopped_by is None
    assert stream.finish() == ""


def test_repeated_stop_prefix_keeps_only_the_part_that_can_still_match() -> None:
    stream = TextStream(["aab"])
    assert stream.push(b"aaa") == "a"  # "aa" may still become "aab"
    assert stream.push(b"a") == "a"
    assert stream.push(b"b") == ""
    assert stream.stopped_by == "aab"


def test_finish_flushes_held_prefix() -> None:
    stream = TextStream(["STOP", "<end>"])
    assert stream.push(b"the end <e") == "the end "
    assert stream.push(b"n") == ""
    assert stream.finish() == "<en"
    assert stream.stopped_by is None


def test_finish_flushes_held_prefix_and_incomplete_bytes() -> None:
    stream = TextStream(["STOP"])
    assert stream.push(b"x ST\xe2") == "x "
    assert stream.finish() == "ST\ufffd"


@pytest.mark.parametrize("stops", [["world", "lo w"], ["lo w", "world"]])
def test_earliest_stop_wins_in_one_push(stops: list[str]) -> None:
    stream = TextStream(stops)
    assert stream.push(b"hello world") == "hel"
    assert stream.stopped_by == "lo w"


@pytest.mark.parametrize("stops", [["BBB", "AB"], ["AB", "BBB"]])
def test_earliest_stop_wins_across_pushes(stops: list[str]) -> None:
    stream = TextStream(stops)
    assert stream.push(b"xA") == "x"  # "A" may start "AB"
    assert stream.push(b"BBB") == ""  # "BBB" is complete too, but "AB" starts earlier
    assert stream.stopped_by == "AB"
    assert stream.finish() == ""


def test_text_after_a_stop_is_never_emitted() -> None:
    stream = TextStream(["STOP"])
    assert stream.push("before STOP after é".encode()) == "before "
    assert stream.stopped_by == "STOP"
    assert stream.finish() == ""


def test_text_after_a_stop_is_dropped_even_with_pending_bytes() -> None:
    stream = TextStream(["STOP"])
    assert stream.push(b"ab STOP \xe2\x82") == "ab "
    assert stream.finish() == ""  # no U+FFFD for the incomplete char after the stop


def test_pushes_after_a_stop_emit_nothing_and_keep_the_first_stop() -> None:
    stream = TextStream(["A", "B"])
    assert stream.push(b"xA") == "x"
    assert stream.push(b"more B text") == ""
    assert stream.push("é".encode()[:1]) == ""
    assert stream.stopped_by == "A"
    assert stream.finish() == ""


def test_stop_at_the_very_start_emits_nothing() -> None:
    stream = TextStream(["\n"])
    assert stream.push(b"\nrest") == ""
    assert stream.stopped_by == "\n"
    assert stream.finish() == ""


def test_empty_stop_strings_are_ignored() -> None:
    stream = TextStream(["", "ZZ"])
    assert stream.push(b"abc") == "abc"
    assert stream.push(b"Z") == ""
    assert stream.finish() == "Z"
    assert stream.stopped_by is None


def test_random_text_with_one_stop_matches_cutting_the_full_text() -> None:
    rng = random.Random(99)
    alphabet = ["a", "b", "S", "T", "é", "€", "😀", " "]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        stop = rng.choice(["ST", "aé", "€😀", "b b", "S"])
        data = text.encode()
        cuts = tuple(sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 15))))) if data else ()
        stream = TextStream([stop])
        out = "".join(feed(stream, splits(data, cuts))) + stream.finish()
        at = text.find(stop)
        assert out == (text if at == -1 else text[:at]), (text, stop, cuts)
        assert stream.stopped_by == (None if at == -1 else stop)
