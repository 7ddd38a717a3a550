"""Tests for rollouttap.addon.jsonspans: finding values in JSON text and replacing them in place."""

from __future__ import annotations

import json
import random
import re

import pytest

from rollouttap.addon.jsonspans import (
    FAST_VALUE,
    INTS,
    id_list_end,
    key_pattern,
    splice_nulls,
    value_spans,
    with_markers,
)

IDS = key_pattern(["token_ids", "prompt_token_ids"])


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ('{"token_ids":[1,2,3]}', ["[1,2,3]"]),
        ('{"prompt_token_ids":[7],"x":{"token_ids":[]}}', ["[7]", "[]"]),
        ('{ "token_ids" :\n [1, 2] }', ["[1, 2]"]),  # not the compact shape: decoded
        ('{"token_ids":null,"a":1}', []),  # null values are left where they are
        ('{"token_ids":"a\\"b\\\\c\\u00e9"}', ['"a\\"b\\\\c\\u00e9"']),
        ('{"token_ids":{"token_ids":[1],"n":{"m":[2]}}}', ['{"token_ids":[1],"n":{"m":[2]}}']),
        ('[{"token_ids":[1]},{"token_ids":[2]}]', ["[1]", "[2]"]),
        ('{"a":"x,\\"token_ids\\":[1]","token_ids":[2]}', ["[2]"]),  # key-like text in a string
        ('{"a":",\\"token_ids\\":[1]"}', []),
        ('{"my_token_ids":[1],"token_idsx":[2],"TOKEN_IDS":[3]}', []),  # other keys
        ('{"logprobs":[1]}', []),
    ],
)  # fmt: skip
def test_value_spans_find_each_value_of_the_keys(text: str, values: list[str]) -> None:
    assert [text[start:end] for start, end in value_spans(text, IDS)] == values


@pytest.mark.parametrize(
    "text",
    ['{"token_ids":[1,}', '{"token_ids":', '{"token_ids":nul}', '{"token_ids":"open}'],
)
def test_value_spans_raise_value_error_where_a_value_is_not_json(text: str) -> None:
    with pytest.raises(ValueError):
        value_spans(text, IDS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"token_ids":[1,2],"text":"hi"}', '{"token_ids":null,"text":"hi"}'),
        ('{ "token_ids" : [1] , "f":1.50E+2 }', '{ "token_ids" : null , "f":1.50E+2 }'),
        ('{"prompt_token_ids":[1],"choices":[{"token_ids":[2],"s":"\\u00e9\\n"}]}',
         '{"prompt_token_ids":null,"choices":[{"token_ids":null,"s":"\\u00e9\\n"}]}'),  # fmt: skip
        ('{"text":"no ids here"}', '{"text":"no ids here"}'),
    ],
)
def test_splice_nulls_replaces_only_the_spans(text: str, expected: str) -> None:
    assert splice_nulls(text, value_spans(text, IDS)) == expected


@pytest.mark.parametrize(
    ("text", "spans", "expected"),
    [
        ("abcdef", [], "abcdef"),
        ("abcdef", [(0, 6)], "null"),
        ("abcdef", [(1, 2), (4, 6)], "anullcdnull"),
        ("abcdef", [(3, 3)], "abcnulldef"),
    ],
)
def test_splice_nulls_on_plain_spans(text: str, spans: list[tuple[int, int]], expected: str) -> None:
    assert splice_nulls(text, spans) == expected


def test_with_markers_parses_each_span_as_a_distinct_number() -> None:
    text = '{"prompt_token_ids":[1],"choices":[{"token_ids":[2],"t":"x"}]}'
    reduced = with_markers(text, value_spans(text, IDS))
    assert reduced is not None
    doc, marks = reduced
    first, second = doc["prompt_token_ids"], doc["choices"][0]["token_ids"]
    assert first != second and {first, second} == marks
    assert doc["choices"][0]["t"] == "x"


@pytest.mark.parametrize(
    ("text", "spans", "expected"),
    [
        ('{"a":1}', [], ({"a": 1}, frozenset())),
        ('{"a":7391820465,"b":[1]}', [(20, 23)], None),  # the text kept holds marker-like numbers
        ('{"a":"7391820465","b":[1]}', [(22, 25)], None),
        ('{"b":[1],"a":[7391820465]}', [(5, 8)], None),
        ('{"a":7391820465}', [(5, 15)], ({"a": -7391820465000000}, frozenset({-7391820465000000}))),  # replaced
    ],
)
def test_with_markers_edge_cases(text: str, spans: list[tuple[int, int]], expected: object) -> None:
    assert with_markers(text, spans) == expected


@pytest.mark.parametrize("text", ['{"a":', "not json", '{"a":1} x'])
def test_with_markers_raises_value_error_when_not_json(text: str) -> None:
    with pytest.raises(ValueError):
        with_markers(text, [])


@pytest.mark.parametrize(
    ("value", "matches"),
    [
        ("[1,2,3]", True),
        ('{"content":[{"token":"a\\"\\\\\\u00e9","logprob":-1.5e-3,"bytes":[97],"top_logprobs":[]}]}',
         True),  # fmt: skip
        ('{"content":[{"token":"a\\q","logprob":0,"bytes":null,"top_logprobs":[]}]}', False),
        ("[1, 2]", False),  # whitespace: left to the decoder
        ('{"n":{"m":[1]}}', False),
    ],
)
def test_fast_value_matches_only_the_compact_vllm_shapes(value: str, matches: bool) -> None:
    match = FAST_VALUE.match(value)
    assert (match is not None and match.end() == len(value)) is matches
    if matches:
        assert json.JSONDecoder().raw_decode(value)[1] == match.end()  # type: ignore[union-attr]


def test_id_lists_end_where_the_ints_pattern_ends() -> None:
    """The string-method check of a token-id list answers what INTS answers, on lists of every shape."""
    rng = random.Random(11)
    pattern = re.compile(INTS)
    pieces = ["0", "1", "7", "20", "305", ",", ",", ",0", "00", "]", " ", "[", "x", '"', "-", "{", "1.5"]
    weights = [6, 6, 6, 6, 6, 12, 12, 1, 1, 3, 1, 1, 1, 1, 1, 1, 1]
    matched = 0
    for _ in range(20_000):
        text = "k:[" + "".join(rng.choices(pieces, weights, k=rng.randrange(0, 12))) + rng.choice(["]", "],1]", ""])
        want = pattern.match(text, 2)
        assert id_list_end(text, 2) == (want.end() if want else -1), text
        matched += want is not None
    assert matched > 2_000  # valid lists were among them


def test_a_long_id_list_is_one_value() -> None:
    ids = ",".join(str(i * 7919 % 151_000) for i in range(100_000))
    text = '{"prompt_token_ids":[' + ids + '],"token_ids":[0,1]}'
    assert [text[a:b] for a, b in value_spans(text, IDS)] == ["[" + ids + "]", "[0,1]"]
