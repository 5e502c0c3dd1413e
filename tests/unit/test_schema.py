"""Tests for pipeline.schema: fingerprints, the single-object codec, the store, compatibility."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.schema import fingerprint as fastavro_fingerprint
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline.codec as codec_module
from pipeline.compat import check_compatible
from pipeline.errors import DecodeError, EncodeError, SchemaCompatibilityError, SchemaError
from pipeline.schema import MAGIC, Schema, SchemaStore

FIXTURES = Path(__file__).parent / "schemas_fixture"

# --- CRC-64-AVRO, written from the reference implementation in the Avro specification ------

_EMPTY64 = 0xC15D213AA4D7A795


def _fp_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY64 & -(fp & 1))
        table.append(fp)
    return table


_FP_TABLE = _fp_table()


def crc64_avro(data: bytes) -> int:
    fp = _EMPTY64
    for byte in data:
        fp = (fp >> 8) ^ _FP_TABLE[(fp ^ byte) & 0xFF]
    return fp


# (input, canonical form, Java SchemaNormalization.parsingFingerprint64 as a signed long),
# from apache/avro share/test/data/schema-tests.txt.
SPEC_VECTORS = [
    ('"null"', '"null"', 7195948357588979594),
    ('"int"', '"int"', 8247732601305521295),
    ('{"type":"int"}', '"int"', 8247732601305521295),
    ('"string"', '"string"', -8142146995180207161),
    ('[ "int" , {"type":"boolean"} ]', '["int","boolean"]', 5392556393470105090),
    (
        '{"fields":[], "type":"record", "name":"foo"}',
        '{"name":"foo","type":"record","fields":[]}',
        -4824392279771201922,
    ),
    (
        '{"fields":[], "type":"record", "name":"foo", "namespace":"x.y"}',
        '{"name":"x.y.foo","type":"record","fields":[]}',
        5916914534497305771,
    ),
    (
        '{ "fields":[{"type":"boolean", "aliases":[], "name":"f1", "default":true},'
        ' {"order":"descending","name":"f2","doc":"Hello","type":"int"}],'
        ' "type":"record", "name":"foo"}',
        '{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"},'
        '{"name":"f2","type":"int"}]}',
        -4860222112080293046,
    ),
    (
        '{"namespace":"x.y.z", "type":"enum", "name":"foo", "doc":"foo bar",'
        ' "symbols":["A1", "A2"]}',
        '{"name":"x.y.z.foo","type":"enum","symbols":["A1","A2"]}',
        -4448647247586288245,
    ),
    (
        '{"name":"foo","type":"fixed","size":15}',
        '{"name":"foo","type":"fixed","size":15}',
        1756455273707447556,
    ),
    (
        '{ "items":{"type":"null"}, "type":"array"}',
        '{"type":"array","items":"null"}',
        -589620603366471059,
    ),
    (
        '{ "values":"string", "type":"map"}',
        '{"type":"map","values":"string"}',
        -8732877298790414990,
    ),
    (
        '{"name":"PigValue","type":"record",'
        ' "fields":[{"name":"value", "type":["null", "int", "long", "PigValue"]}]}',
        '{"name":"PigValue","type":"record","fields":[{"name":"value",'
        '"type":["null","int","long","PigValue"]}]}',
        -1759257747318642341,
    ),
]


@pytest.mark.parametrize(("text", "canonical", "java_long"), SPEC_VECTORS)
def test_fingerprint_matches_spec_vectors_in_little_endian(
    text: str, canonical: str, java_long: int
) -> None:
    schema = Schema.from_json(text)
    wire = struct.pack("<q", java_long)  # single-object encoding: 8 bytes, little-endian
    assert schema.fingerprint == wire
    assert crc64_avro(canonical.encode()) == java_long & 0xFFFFFFFFFFFFFFFF
    # fastavro's hex string already lists the bytes in wire (little-endian) order.
    assert bytes.fromhex(fastavro_fingerprint(canonical, "CRC-64-AVRO")) == wire


def test_fingerprint_byte_order_is_not_big_endian() -> None:
    fp = Schema.from_json("int").fingerprint
    assert fp.hex() == "8f5c393f1ad57572"
    assert fp != (8247732601305521295).to_bytes(8, "big")


# --- schemas used below --------------------------------------------------------------------

ALL_TYPES: dict[str, Any] = {
    "type": "record",
    "name": "AllTypes",
    "namespace": "com.example",
    "fields": [
        {"name": "i", "type": "int"},
        {"name": "l", "type": "long"},
        {"name": "s", "type": "string"},
        {"name": "d", "type": "double"},
        {"name": "opt", "type": ["null", "string"], "default": None},
        {
            "name": "color",
            "type": {"type": "enum", "name": "Color", "symbols": ["RED", "GREEN", "BLUE"]},
        },
        {"name": "tags", "type": {"type": "array", "items": "int"}},
    ],
}

ORDER_V1: dict[str, Any] = {
    "type": "record",
    "name": "com.example.Order",
    "fields": [{"name": "id", "type": "string"}, {"name": "qty", "type": "int"}],
}
ORDER_V2: dict[str, Any] = {
    "type": "record",
    "name": "com.example.Order",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "qty", "type": "long"},
        {"name": "note", "type": "string", "default": "none"},
    ],
}


def store_with(*schemas: Any) -> SchemaStore:
    store = SchemaStore()
    for schema in schemas:
        store.add(schema)
    return store


INT32 = st.integers(-(2**31), 2**31 - 1)
ALL_TYPES_VALUES = st.fixed_dictionaries(
    {
        "i": INT32,
        "l": st.integers(-(2**63), 2**63 - 1),
        "s": st.text(),
        "d": st.floats(allow_nan=False),
        "opt": st.none() | st.text(max_size=20),
        "color": st.sampled_from(["RED", "GREEN", "BLUE"]),
        "tags": st.lists(INT32, max_size=20),
    }
)


# --- codec ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(ALL_TYPES_VALUES)
def test_round_trip(value: dict[str, Any]) -> None:
    codec = store_with(ALL_TYPES).codec("com.example.AllTypes")
    assert codec.validate(value) is None
    assert codec.decode(codec.encode(value)) == value


def test_codec_reuses_buffer_without_mixing_records() -> None:
    codec = store_with(ORDER_V1).codec("com.example.Order")
    long_one = codec.encode({"id": "x" * 100, "qty": 1})
    short_one = codec.encode({"id": "y", "qty": 2})
    assert codec.decode(long_one) == {"id": "x" * 100, "qty": 1}
    assert codec.decode(short_one) == {"id": "y", "qty": 2}
    assert codec.decode_many(codec.encode_many([{"id": "a", "qty": 3}])) == [{"id": "a", "qty": 3}]


def test_wire_header_is_magic_then_fingerprint_then_plain_avro_body() -> None:
    store = store_with(ORDER_V1)
    schema = store.get("com.example.Order")
    value = {"id": "o-1", "qty": 3}
    data = store.codec("com.example.Order").encode(value)
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(ORDER_V1), value)
    assert data == b"\xc3\x01" + schema.fingerprint + body.getvalue()
    assert data[:2] == MAGIC
    assert schema.fingerprint == bytes.fromhex(
        fastavro_fingerprint(fastavro.schema.to_parsing_canonical_form(ORDER_V1), "CRC-64-AVRO")
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "too short"),
        (b"\xc3", "too short"),
        (b"\xc3\x01\x00\x01\x02", "too short"),
        (b'{"id": "o-1", "qty": 3}', "starts with 7b 22, expected c3 01"),
        (b"\xc3\x02" + b"\x00" * 12, "starts with c3 02"),
        (b"\xc3\x01" + b"\x00" * 8 + b"\x02a\x06", "unknown schema fingerprint 0000000000000000"),
    ],
)
def test_bad_header_is_a_decode_error(data: bytes, expected: str) -> None:
    codec = store_with(ORDER_V1).codec("com.example.Order")
    with pytest.raises(DecodeError, match=expected):
        codec.decode(data)


def test_corrupt_body_is_a_decode_error() -> None:
    codec = store_with(ORDER_V1, ALL_TYPES).codec("com.example.Order")
    good = codec.encode({"id": "order-1", "qty": 3})
    with pytest.raises(DecodeError, match="corrupt Avro record") as truncated:
        codec.decode(good[:-3])
    assert truncated.value.__cause__ is not None
    with pytest.raises(DecodeError, match="trailing bytes"):
        codec.decode(good + b"\x00")
    # Enum index 9 of a 3-symbol enum, written with a known schema.
    enum_codec = store_with(ALL_TYPES).codec("com.example.AllTypes")
    fp = enum_codec.schema.fingerprint
    bad_enum = MAGIC + fp + b"\x02\x02\x02a" + b"\x00" * 8 + b"\x00" + b"\x12" + b"\x00"
    with pytest.raises(DecodeError, match="corrupt Avro record"):
        enum_codec.decode(bad_enum)


def test_bad_value_is_an_encode_error_with_the_reason() -> None:
    codec = store_with(ORDER_V1).codec("com.example.Order")
    with pytest.raises(EncodeError, match=r"com\.example\.Order\.qty is 'three' \(str\)") as err:
        codec.encode({"id": "o-1", "qty": "three"})
    assert "expected int" in str(err.value)
    assert err.value.__cause__ is not None
    assert codec.validate({"id": "o-1", "qty": 3}) is None
    assert codec.validate({"id": "o-1"}) == "com.example.Order.qty is missing or null, expected int"
    reason = codec.validate({"id": "o-1", "qty": 2**40})
    assert reason is not None and "expected int" in reason


def test_validate_on_encode_rejects_what_fastavro_would_silently_write() -> None:
    store = store_with(ORDER_V1)
    lenient = store.codec("com.example.Order")
    lenient.encode({"id": "o-1", "qty": 1.5})  # fastavro truncates; documented leniency
    strict = store.codec("com.example.Order", validate_on_encode=True)
    with pytest.raises(EncodeError, match=r"qty is 1\.5"):
        strict.encode({"id": "o-1", "qty": 1.5})


def test_union_and_enum_reasons() -> None:
    codec = store_with(ALL_TYPES).codec("com.example.AllTypes")
    value = {"i": 1, "l": 2, "s": "s", "d": 1.0, "opt": 5, "color": "RED", "tags": []}
    assert codec.validate(value) == "com.example.AllTypes.opt is 5 (int), expected null or string"
    reason = codec.validate(value | {"opt": None, "color": "PINK"})
    assert reason == (
        "com.example.AllTypes.color is 'PINK' (str), "
        "expected enum com.example.Color (RED, GREEN, BLUE)"
    )


# --- evolution -----------------------------------------------------------------------------


def test_reader_resolves_an_older_writer_schema() -> None:
    old = store_with(ORDER_V1).codec("com.example.Order").encode({"id": "o-1", "qty": 3})
    reader_store = store_with(ORDER_V1, ORDER_V2)  # v2 is the latest version
    codec = reader_store.codec("com.example.Order")
    assert codec.schema.fingerprint != old[2:10]
    assert codec.decode(old) == {"id": "o-1", "qty": 3, "note": "none"}
    new = codec.encode({"id": "o-2", "qty": 2**40, "note": "n"})
    # Alternate writers: the cached last writer must not leak into the next record.
    assert codec.decode_many([old, new, old]) == [
        {"id": "o-1", "qty": 3, "note": "none"},
        {"id": "o-2", "qty": 2**40, "note": "n"},
        {"id": "o-1", "qty": 3, "note": "none"},
    ]


def test_two_older_writers_interleaved_each_resolve_with_their_own_schema() -> None:
    v3 = ORDER_V2 | {"fields": [*ORDER_V2["fields"], {"name": "ch", "type": "int", "default": 7}]}
    from_v1 = store_with(ORDER_V1).codec("com.example.Order").encode({"id": "a", "qty": 1})
    from_v2 = (
        store_with(ORDER_V2).codec("com.example.Order").encode({"id": "b", "qty": 2, "note": "n"})
    )
    codec = store_with(ORDER_V1, ORDER_V2, v3).codec("com.example.Order")
    one = {"id": "a", "qty": 1, "note": "none", "ch": 7}
    two = {"id": "b", "qty": 2, "note": "n", "ch": 7}
    assert codec.decode_many([from_v1, from_v2, from_v2, from_v1]) == [one, two, two, one]


def test_decode_accepts_bytearray_and_memoryview() -> None:
    codec = store_with(ORDER_V1).codec("com.example.Order")
    data = codec.encode({"id": "o-1", "qty": 3})
    assert (
        codec.decode(bytearray(data)) == codec.decode(memoryview(data)) == {"id": "o-1", "qty": 3}
    )


def test_resolution_is_skipped_only_when_writer_equals_reader(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = store_with(ORDER_V1, ORDER_V2)
    v2 = store.codec("com.example.Order")
    old = store_with(ORDER_V1).codec("com.example.Order").encode({"id": "a", "qty": 1})
    same = v2.encode({"id": "b", "qty": 2, "note": ""})
    readers: list[Any] = []
    real = codec_module.schemaless_reader

    def spy(stream: Any, writer: Any, reader: Any = None) -> Any:
        readers.append(reader)
        return real(stream, writer, reader)

    monkeypatch.setattr(codec_module, "schemaless_reader", spy)
    v2.decode(same)
    v2.decode(old)
    assert readers[0] is None
    assert readers[1] is v2.schema.parsed


def test_unresolvable_writer_is_a_decode_error() -> None:
    text = {"type": "record", "name": "com.example.Order", "fields": [{"name": "x", "type": "int"}]}
    writer_data = store_with(text).codec("com.example.Order").encode({"x": 1})
    codec = store_with(text, ORDER_V1).codec("com.example.Order")
    with pytest.raises(DecodeError, match=r"com\.example\.Order as com\.example\.Order"):
        codec.decode(writer_data)


# --- store ---------------------------------------------------------------------------------


def test_directory_with_cross_file_references_loads_in_dependency_order() -> None:
    store = SchemaStore.from_directory(FIXTURES)
    assert store.names() == [
        "com.example.Address",
        "com.example.Customer",
        "com.example.Order",
        "com.example.Tier",
    ]
    order = store.get("com.example.Order")
    assert order.source == FIXTURES / "a_order.avsc"
    value = {
        "order_id": "o-1",
        "customer": {"name": "Ada", "home": {"city": "Oslo", "zip": "0150"}, "tier": "GOLD"},
        "ship_to": {"city": "Bergen", "zip": "5003"},
    }
    codec = store.codec("com.example.Order")
    assert codec.decode(codec.encode(value)) == value
    assert store.by_fingerprint(order.fingerprint) is order
    assert store.by_fingerprint(b"\x00" * 8) is None


def test_referenced_types_are_inlined_for_a_java_compatible_fingerprint() -> None:
    store = SchemaStore.from_directory(FIXTURES)
    customer = store.get("com.example.Customer")
    address = json.loads((FIXTURES / "c_address.avsc").read_text())
    inlined = json.loads((FIXTURES / "b_customer.avsc").read_text())
    inlined["fields"][1]["type"] = address
    assert customer.fingerprint == Schema.from_json(inlined).fingerprint


def test_unknown_name_lists_known_names() -> None:
    store = store_with(ORDER_V1)
    with pytest.raises(SchemaError, match=r"unknown schema 'Order'; known schemas: com\.example"):
        store.get("Order")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_bad_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "order.avsc", '{\n  "type": "record"\n    "name": "X"\n}\n')
    with pytest.raises(SchemaError) as err:
        SchemaStore.from_directory(tmp_path)
    assert str(err.value) == f"{path}: invalid JSON at line 3, column 5: Expecting ',' delimiter"
    assert isinstance(err.value.__cause__, json.JSONDecodeError)


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        (
            {"type": "record", "name": "X", "fields": [{"name": "a", "type": "integer"}]},
            "invalid Avro schema: unknown type 'integer' (not defined by any .avsc file in",
        ),
        ({"type": "array"}, "invalid Avro schema: missing required attribute 'items'"),
        (
            {"type": "enum", "name": "E", "symbols": ["A", "A"]},
            "invalid Avro schema: All symbols in an enum must be unique",
        ),
        (
            {"type": "record", "name": "X", "fields": [{"name": "a", "type": "int"}] * 2},
            "invalid Avro schema: Field name a already in use",
        ),
        (42, "invalid Avro schema: expected a JSON object, array or type name, got int"),
    ],
)
def test_invalid_avro_names_file_and_reason(tmp_path: Path, schema: Any, reason: str) -> None:
    good = write(tmp_path, "a_good.avsc", json.dumps(ORDER_V1))
    bad = write(tmp_path, "b_bad.avsc", json.dumps(schema))
    with pytest.raises(SchemaError) as err:
        SchemaStore.from_directory(tmp_path)
    assert str(err.value).startswith(f"{bad}: {reason}")
    assert str(good) not in str(err.value)
    if not isinstance(schema, int):  # a library error was translated, not swallowed
        assert err.value.__cause__ is not None


def test_empty_file_and_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="schema directory not found"):
        SchemaStore.from_directory(tmp_path / "nope")
    empty = write(tmp_path, "empty.avsc", "\n")
    with pytest.raises(SchemaError, match=f"{empty}: empty schema file"):
        SchemaStore.from_directory(tmp_path)


def test_two_files_defining_one_name_differently(tmp_path: Path) -> None:
    first = write(tmp_path, "a.avsc", json.dumps(ORDER_V1))
    second = write(tmp_path, "b.avsc", json.dumps(ORDER_V2))
    with pytest.raises(SchemaError) as err:
        SchemaStore.from_directory(tmp_path)
    assert str(err.value) == f"{second}: redefines com.example.Order differently from {first}"
    write(tmp_path, "b.avsc", json.dumps(ORDER_V1 | {"doc": "same canonical form"}))
    assert SchemaStore.from_directory(tmp_path).names() == ["com.example.Order"]


def test_add_accepts_text_and_type_names() -> None:
    store = SchemaStore()
    assert store.add(json.dumps(ORDER_V1)).name == "com.example.Order"
    assert store.add("long").name == "long"
    union = store.add('["null", "com.example.Order"]')  # anonymous: named by canonical form
    assert union.name.startswith('["null",{"name":"com.example.Order","type":"record"')
    with pytest.raises(SchemaError, match="invalid JSON at line 1"):
        store.add("{nope")


def test_schema_is_hashable_and_compares_by_content() -> None:
    a = Schema.from_json(ORDER_V1)
    b = Schema.from_json(json.dumps(ORDER_V1), source=Path("x.avsc"))
    assert a == b and hash(a) == hash(b)
    assert a != Schema.from_json(ORDER_V2)
    assert "com.example.Order" in repr(a)


# --- compatibility -------------------------------------------------------------------------

ENRICHED = {
    "type": "record",
    "name": "com.example.Enriched",
    "fields": [{"name": "id", "type": "string"}, {"name": "amount", "type": "double"}],
}
PRICED = {
    "type": "record",
    "name": "com.example.Priced",
    "aliases": ["com.example.Enriched"],
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "amount", "type": "double"},
        {"name": "total", "type": "double"},
    ],
}


def check(writer: Any, reader: Any) -> None:
    check_compatible(
        Schema.from_json(writer),
        Schema.from_json(reader),
        writer_label="stage 'enrich'",
        reader_label="stage 'price'",
    )


def test_incompatible_names_both_stages_and_the_field() -> None:
    with pytest.raises(SchemaCompatibilityError) as err:
        check(ENRICHED, PRICED)
    assert str(err.value) == (
        "stage 'enrich' writes com.example.Enriched, which stage 'price' cannot read as "
        "com.example.Priced: field 'total' (reader field without default missing in writer)"
    )


def test_incompatible_reports_nested_fields_types_enums_and_names() -> None:
    customer = {
        "type": "record",
        "name": "com.example.Customer",
        "fields": [
            {
                "name": "tier",
                "type": {
                    "type": "enum",
                    "name": "com.example.Tier",
                    "symbols": ["BASIC", "GOLD", "PLATINUM"],
                },
            },
            {"name": "age", "type": "long"},
        ],
    }
    reader = json.loads(json.dumps(customer))
    reader["fields"][0]["type"]["symbols"] = ["BASIC", "GOLD"]
    reader["fields"][1]["type"] = "int"
    wrap = {"type": "record", "name": "com.example.W", "fields": [{"name": "c", "type": customer}]}
    wrap_r = {"type": "record", "name": "com.example.W", "fields": [{"name": "c", "type": reader}]}
    with pytest.raises(SchemaCompatibilityError) as err:
        check(wrap, wrap_r)
    message = str(err.value)
    assert "field 'c.tier' (writer enum symbols missing in reader: PLATINUM)" in message
    assert "field 'c.age' (reader type: int not compatible with writer type: long)" in message
    # Another name and the same fields: an alias is the fix, and the message says so.
    renamed = {**ENRICHED, "name": "com.example.Priced"}
    with pytest.raises(SchemaCompatibilityError, match=r'add "aliases": \["com\.example\.Enriched'):
        check(ENRICHED, renamed)
    # Another name and a field the writer lacks: an alias would not help; no such hint.
    unaliased = {**PRICED, "aliases": []}
    with pytest.raises(SchemaCompatibilityError) as err:
        check(ENRICHED, unaliased)
    assert "aliases" not in str(err.value)
    assert "does not match writer type com.example.Enriched" in str(err.value)
    assert "field 'total' (reader field without default missing in writer)" in str(err.value)


def test_incompatible_inside_a_union_branch() -> None:
    address = {
        "type": "record",
        "name": "com.example.Address",
        "fields": [{"name": "city", "type": "string"}],
    }
    new_address = {**address, "fields": [*address["fields"], {"name": "zip", "type": "string"}]}

    def holder(addr: Any) -> Any:
        return {
            "type": "record",
            "name": "com.example.H",
            "fields": [{"name": "ship_to", "type": ["null", addr], "default": None}],
        }

    with pytest.raises(SchemaCompatibilityError, match=r"field 'ship_to\.zip' \(reader field"):
        check(holder(address), holder(new_address))
    with pytest.raises(SchemaCompatibilityError, match="reader has no union branch for string"):
        check(
            {"type": "record", "name": "R", "fields": [{"name": "x", "type": ["null", "string"]}]},
            {"type": "record", "name": "R", "fields": [{"name": "x", "type": ["null", "int"]}]},
        )


@pytest.mark.parametrize(
    ("writer", "reader"),
    [
        (ORDER_V1, ORDER_V2),  # new field with a default, int promoted to long
        (ORDER_V2, ORDER_V1 | {"fields": [{"name": "id", "type": "string"}]}),  # dropped fields
        (ENRICHED, {**PRICED, "fields": PRICED["fields"][:2]}),  # renamed via alias
        ("string", ["null", "string"]),
        (
            {"type": "enum", "name": "E", "symbols": ["A"]},
            {"type": "enum", "name": "E", "symbols": ["A", "B"]},
        ),
        (ORDER_V1, ORDER_V1),
    ],
)
def test_compatible_pairs_pass(writer: Any, reader: Any) -> None:
    check(writer, reader)
