"""QEMU's KEY=VALUE,... syntax: the round trip, nesting, escaping, and QEMU's error wording."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockdev import keyval
from blockdev.keyval import KeyvalError

names = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,8}", fullmatch=True)
values = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
trees = st.recursive(
    values,
    lambda children: st.dictionaries(names, children, min_size=1, max_size=4),
    max_leaves=12,
)
options = st.dictionaries(names, trees, max_size=5)


@given(options)
def test_parse_inverts_format(opts):
    assert keyval.parse(keyval.format(opts)) == opts


@given(options)
def test_format_of_parse_is_a_fixed_point(opts):
    text = keyval.format(opts)
    assert keyval.format(keyval.parse(text)) == text


@given(values)
def test_commas_are_doubled_and_undoubled(value):
    text = keyval.format({"v": value})
    assert text.count(",") == 2 * value.count(",")
    assert keyval.parse(text) == {"v": value}


def test_dotted_keys_nest():
    assert keyval.parse("driver=nbd,server.type=unix,server.path=/x,export=e") == {
        "driver": "nbd", "server": {"type": "unix", "path": "/x"}, "export": "e"}


def test_escaped_comma_and_trailing_comma():
    assert keyval.parse("filename=a,,b,,,x=1,") == {"filename": "a,b,", "x": "1"}


def test_numeric_keys_make_a_list():
    assert keyval.parse("s.0.host=a,s.1.host=b") == {"s": [{"host": "a"}, {"host": "b"}]}
    with pytest.raises(KeyvalError, match=r"Parameter 's.1' missing"):
        keyval.parse("s.0=a,s.2=b")


def test_last_value_wins():
    assert keyval.parse("a=1,a=2") == {"a": "2"}


def test_implied_key():
    assert keyval.parse("throttle-group,id=x", implied_key="qom-type") == {
        "qom-type": "throttle-group", "id": "x"}


@pytest.mark.parametrize(("text", "message"), [
    ("driver", "No implicit parameter name for value 'driver'"),
    ("a=1,b", "Expected '=' after parameter 'b'"),
    ("a!b=1", "Invalid parameter 'a!b'"),
    ("a..b=1", "Invalid parameter 'a..b'"),
    ("=1", "Invalid parameter ''"),
    ("a=1,a.b=2", "Parameters 'a.*' used inconsistently"),
    ("a.b=2,a=1", "Parameters 'a.*' used inconsistently"),
    ("s.0=a,s.x=b", "Parameters 's.*' used inconsistently"),
    ("k" * 129 + "=1", "is too long"),
])
def test_errors_are_one_line_as_qemu_words_them(text, message):
    with pytest.raises(KeyvalError) as info:
        keyval.parse(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_json_form():
    assert keyval.parse_option('{"driver": "file", "cache": {"direct": true}}') == {
        "driver": "file", "cache": {"direct": True}}
    assert keyval.parse_option("driver=file") == {"driver": "file"}
    with pytest.raises(KeyvalError, match="JSON parse error"):
        keyval.parse_option('{"driver": ')
    with pytest.raises(KeyvalError, match="JSON parse error"):
        keyval.parse_option("{" * 100000)


def test_format_refuses_non_strings():
    with pytest.raises(KeyvalError, match="only strings"):
        keyval.format({"a": 1})
