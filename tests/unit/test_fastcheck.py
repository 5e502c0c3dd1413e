"""The compiled fast check never vouches for a value fastavro rejects, and vouches for the
values publishers send every day (so validation stays off fastavro's slow path)."""

from __future__ import annotations

from typing import Any

from fastavro import parse_schema
from fastavro.validation import validate
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pipeline.fastcheck import compile_check
from pipeline.schema import SchemaStore

TREE: dict[str, Any] = {
    "type": "record",
    "name": "t.Node",
    "fields": [
        {"name": "name", "type": "string"},
        {"name": "small", "type": "int"},
        {"name": "big", "type": "long"},
        {"name": "ratio", "type": "float"},
        {"name": "flag", "type": "boolean"},
        {"name": "blob", "type": "bytes"},
        {"name": "digest", "type": {"type": "fixed", "name": "t.Digest", "size": 4}},
        {
            "name": "colour",
            "type": {"type": "enum", "name": "t.Colour", "symbols": ["RED", "BLUE"]},
        },
        {"name": "again", "type": "t.Colour"},
        {"name": "maybe", "type": ["null", "string", "long"], "default": None},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "counts", "type": {"type": "map", "values": "int"}},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {
            "name": "price",
            "type": {"type": "bytes", "logicalType": "decimal", "precision": 6, "scale": 2},
        },
        {"name": "children", "type": {"type": "array", "items": "t.Node"}},
        {"name": "parent", "type": ["null", "t.Node"], "default": None},
    ],
}
PARSED = parse_schema(TREE)
CHECK = compile_check(PARSED)

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.binary(max_size=6),
    st.sampled_from(["RED", "BLUE", "GREEN"]),
    st.lists(st.integers(), max_size=3),
    st.tuples(st.text(max_size=2)),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


def _mostly(valid: st.SearchStrategy[Any], near: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly valid, so whole values often pass; else a near miss (out of range, wrong size,
    wrong symbol) or junk of any type."""
    return st.integers(0, 19).flatmap(lambda i: st.one_of(near, junk) if i == 7 else valid)


def _node(depth: int) -> st.SearchStrategy[Any]:
    children = st.just([]) if depth == 0 else st.lists(_node(depth - 1), max_size=2)
    parent = st.none() if depth == 0 else st.one_of(st.none(), _node(depth - 1))
    beyond = st.integers(min_value=2**31, max_value=2**70).flatmap(
        lambda n: st.sampled_from([n, -n - 1])
    )
    fields = {
        "name": _mostly(st.text(max_size=5), st.binary(max_size=2)),
        "small": _mostly(st.integers(-(2**31), 2**31 - 1), beyond),
        "big": _mostly(st.integers(-(2**63), 2**63 - 1), beyond.map(lambda n: n * 2**33)),
        "ratio": _mostly(st.one_of(st.floats(), st.integers(-5, 5)), st.booleans()),
        "flag": _mostly(st.booleans(), st.integers(0, 1)),
        "blob": _mostly(st.binary(max_size=4), st.text(max_size=2)),
        "digest": _mostly(st.binary(min_size=4, max_size=4), st.binary(max_size=8)),
        "colour": _mostly(st.sampled_from(["RED", "BLUE"]), st.sampled_from(["red", "GREEN"])),
        "again": _mostly(st.sampled_from(["RED", "BLUE"]), st.just("")),
        "maybe": _mostly(
            st.one_of(st.none(), st.text(max_size=3), st.integers(-(2**63), 2**63 - 1)), beyond
        ),
        "tags": _mostly(st.lists(st.text(max_size=3), max_size=3), st.lists(junk, max_size=2)),
        "counts": _mostly(
            st.dictionaries(st.text(max_size=2), st.integers(0, 9), max_size=2),
            st.dictionaries(st.integers(), st.integers(), max_size=2),
        ),
        "at": _mostly(st.integers(min_value=0, max_value=2**62), beyond.map(lambda n: n << 40)),
        "price": _mostly(st.binary(max_size=3), st.decimals(allow_nan=False)),
        "children": _mostly(children, st.tuples(children)),
        "parent": _mostly(parent, st.just({})),
    }
    whole = st.fixed_dictionaries({}, optional=fields)  # fields may be missing
    return st.one_of(st.fixed_dictionaries(fields), whole)


@settings(max_examples=800, deadline=None)
@given(_node(2))
def test_the_fast_check_never_vouches_for_an_invalid_value(value: Any) -> None:
    vouched = CHECK(value)
    event(f"vouched: {vouched}")  # `pytest --hypothesis-show-statistics` shows both occur
    if vouched:
        assert validate(value, PARSED, raise_errors=False), value


def test_the_fast_check_vouches_for_plain_valid_values() -> None:
    leaf = {
        "name": "leaf", "small": 2**31 - 1, "big": -(2**63), "ratio": 1, "flag": False,
        "blob": b"", "digest": b"abcd", "colour": "RED", "again": "BLUE", "maybe": 7,
        "tags": ["a"], "counts": {"x": 1}, "at": 1_767_225_600_000, "price": b"\x01",
        "children": [], "parent": None,
    }  # fmt: skip
    root = dict(leaf, name="root", children=[leaf, leaf], parent=leaf, maybe=None, ratio=0.5)
    for value in (leaf, root):
        assert validate(value, PARSED, raise_errors=False)
        assert CHECK(value)
    for bad in (
        dict(leaf, small=2**31),  # beyond 32 bits: fastavro's writer would write it anyway
        dict(leaf, big=2**63),
        dict(leaf, small=1.5),
        dict(leaf, flag=1),
        dict(leaf, digest=b"abc"),
        dict(leaf, colour="GREEN"),
        dict(leaf, tags=["a", 1]),
        dict(leaf, counts={1: 1}),
        dict(leaf, children=[dict(leaf, name=None)]),
    ):
        assert not CHECK(bad)
        assert not validate(bad, PARSED, raise_errors=False)


def test_codec_validate_says_why_and_accepts_fast(tmp_path: Any) -> None:
    store = SchemaStore()
    codec = store.codec(store.add(TREE).name)
    leaf = {
        "name": "n", "small": 1, "big": 1, "ratio": 1.0, "flag": True, "blob": b"",
        "digest": b"abcd", "colour": "RED", "again": "RED", "maybe": None, "tags": [],
        "counts": {}, "at": 0, "price": b"", "children": [], "parent": None,
    }  # fmt: skip
    assert codec.validate(leaf) is None
    without_default = {k: v for k, v in leaf.items() if k != "maybe"}  # the slow path says yes
    assert codec.validate(without_default) is None
    reason = codec.validate(dict(leaf, small="one"))
    assert reason is not None and "small" in reason


def test_codecs_of_one_schema_share_one_compiled_check() -> None:
    """Codecs are made per record in places (a decode per dead letter): the check is compiled
    once per schema, not per codec."""
    store = SchemaStore()
    name = store.add(TREE).name
    first, second = store.codec(name), store.codec(name)
    assert first._fast is second._fast
