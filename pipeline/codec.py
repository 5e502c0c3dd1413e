"""The Avro single-object codec: the per-record hot path of every stage.

Records travel as ``C3 01``, the writer schema's 8-byte CRC-64-AVRO fingerprint, then the
schemaless Avro body. :class:`Codec` encodes with its schema and decodes whatever writer
schema the fingerprint names, resolving it against its own only when the two differ.
fastavro errors become :class:`~pipeline.errors.DecodeError` / ``EncodeError`` here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from io import BytesIO
from typing import TYPE_CHECKING, Any, Final

from fastavro import schemaless_reader, schemaless_writer
from fastavro.validation import ValidationError, validate

from pipeline.errors import DecodeError, EncodeError
from pipeline.fastcheck import compile_check

if TYPE_CHECKING:
    from pipeline.schema import Schema, SchemaStore

__all__ = ["HEADER_SIZE", "MAGIC", "Codec"]

MAGIC: Final = b"\xc3\x01"  # opens every single-object encoded record
HEADER_SIZE: Final = 10  # MAGIC + 8-byte fingerprint; the Avro body starts here


class Codec:
    """Encodes and decodes Avro single-object records for one (reader) schema.

    Not thread-safe: it reuses one write buffer. Use one codec per worker.

    Args:
        schema: The schema values are written with and read as.
        store: Where writer schemas are found by fingerprint when decoding.
        validate_on_encode: Check each value before writing it. fastavro's writer is lenient
            (it writes ``1.5`` as ``1`` and an ``int`` beyond 32 bits); validating catches
            that (a compiled check, :mod:`pipeline.fastcheck`, then fastavro's validator
            for what it cannot vouch for).

    Example:
        >>> store = SchemaStore()
        >>> codec = store.codec(store.add("string").name)
        >>> data = codec.encode("hi")
        >>> data[:2].hex(), codec.decode(data)
        ('c301', 'hi')
    """

    __slots__ = (
        "_buffer",
        "_check",
        "_fast",
        "_fields",
        "_fp",
        "_last_fp",
        "_last_writer",
        "_parsed",
        "_writers",
        "schema",
    )

    def __init__(
        self, schema: Schema, store: SchemaStore, *, validate_on_encode: bool = False
    ) -> None:
        self.schema = schema
        self._parsed = schema.parsed
        self._fp = schema.fingerprint
        self._writers = store._by_fp  # live: writer schemas added later are found too
        self._last_fp, self._last_writer = b"", None
        self._check = validate_on_encode
        self._fast = _fast_check(schema)  # valid for sure, or ask fastavro
        self._buffer = BytesIO(MAGIC + schema.fingerprint)  # the header stays; bodies follow
        # A record's field names: fastavro drops a dict's extra keys without a word, so a
        # typo in a field name would lose that value silently (see encode).
        raw = schema.parsed
        self._fields: frozenset[str] | None = (
            frozenset(f["name"] for f in raw["fields"])
            if isinstance(raw, dict) and raw.get("type") == "record"
            else None
        )

    def encode(self, value: Any) -> bytes:
        """Return ``value`` as single-object encoded bytes.

        Raises:
            EncodeError: The value does not match the schema; the message says where.
        """
        if self._check and (reason := self.validate(value)) is not None:
            raise EncodeError(f"value does not match {self.schema.name}: {reason}")
        fields = self._fields
        # One C-level subset check per record (~0.1 us): a typo that replaces a field with a
        # default must not pass either.
        if fields is not None and type(value) is dict and not fields.issuperset(value):
            extra = value.keys() - fields
            if extra:
                raise EncodeError(
                    f"value does not match {self.schema.name}: field(s) "
                    f"{', '.join(sorted(map(str, extra)))} not in the schema (a typo? an "
                    f"extra field would be dropped silently)"
                )
        buffer = self._buffer
        buffer.seek(HEADER_SIZE)
        buffer.truncate()
        try:
            schemaless_writer(buffer, self._parsed, value)
        except Exception as exc:
            reason = self.validate(value) or str(exc)
            raise EncodeError(f"value does not match {self.schema.name}: {reason}") from exc
        return buffer.getvalue()

    def encode_many(self, values: Iterable[Any]) -> list[bytes]:
        """Encode each value; see :meth:`encode`."""
        encode = self.encode
        return [encode(value) for value in values]

    def decode(self, data: bytes) -> Any:
        """Return the value in ``data``, resolved to this codec's schema if written with another.

        Raises:
            DecodeError: Too short, wrong marker, unknown fingerprint, or a corrupt body.
        """
        if data is None:
            raise DecodeError("null value (a tombstone), not an Avro record")
        if data[:2] != MAGIC or len(data) < HEADER_SIZE:
            raise _bad_header(data)
        fp = data[2:HEADER_SIZE]
        if fp == self._fp:  # same canonical form: resolution would change nothing, skip it
            writer, reader = self._parsed, None
        elif fp == self._last_fp:
            writer, reader = self._last_writer, self._parsed
        else:
            writer, reader = self._find_writer(fp), self._parsed
        stream = BytesIO(data)  # shares the memory of a bytes object: no copy
        stream.seek(HEADER_SIZE)
        try:
            value = schemaless_reader(stream, writer, reader)
        except Exception as exc:
            raise self._bad_body(fp, str(exc) or f"{type(exc).__name__} (truncated?)") from exc
        if stream.tell() != len(data):
            raise self._bad_body(fp, "trailing bytes after the record")
        return value

    def decode_many(self, items: Iterable[bytes]) -> list[Any]:
        """Decode each item; see :meth:`decode`."""
        decode = self.decode
        return [decode(item) for item in items]

    def validate(self, value: Any) -> str | None:
        """Return why ``value`` breaks the schema, or None if it matches."""
        if self._fast(value):
            return None
        try:
            validate(value, self._parsed, raise_errors=True)
        except ValidationError as exc:
            return _validation_reason(exc)
        except Exception as exc:
            return str(exc) or type(exc).__name__
        return None

    def _find_writer(self, fp: bytes) -> Any:
        writer = self._writers.get(key := bytes(fp))
        if writer is None:
            raise DecodeError(
                f"unknown schema fingerprint {key.hex()} (reading {self.schema.name})"
            )
        self._last_fp, self._last_writer = key, writer.parsed
        return writer.parsed

    def _bad_body(self, fp: bytes, reason: str) -> DecodeError:
        what = self.schema.name
        if fp != self._fp:
            what = f"{self._writers[bytes(fp)].name} as {what}"
        return DecodeError(f"corrupt Avro record ({what}): {reason}")


_FAST_CHECKS: dict[str, Any] = {}  # schema JSON -> compiled check (codecs are made often)
_BY_SCHEMA: dict[int, tuple[Schema, Any]] = {}  # id -> (the schema, kept alive; its check)


def _fast_check(schema: Schema) -> Any:
    """The compiled check of ``schema``, compiled once per process: it generates code, which
    takes milliseconds, and codecs are made per call in places (1 us then, for a schema seen
    before). Keyed by the whole schema, not its fingerprint: the canonical form leaves out
    logical types."""
    known = _BY_SCHEMA.get(id(schema))
    if known is not None and known[0] is schema:
        return known[1]
    key = json.dumps(schema.raw, sort_keys=True)
    check = _FAST_CHECKS.get(key)
    if check is None:
        check = _FAST_CHECKS[key] = compile_check(schema.parsed)
    _BY_SCHEMA[id(schema)] = (schema, check)
    return check


def _bad_header(data: bytes) -> DecodeError:
    if len(data) >= 2 and data[:2] != MAGIC:
        return DecodeError(
            f"not Avro single-object encoding: starts with {bytes(data[:2]).hex(' ')}, "
            "expected c3 01"
        )
    return DecodeError(f"record of {len(data)} bytes is too short (at least {HEADER_SIZE})")


def _type_label(schema: Any) -> str:
    if isinstance(schema, list):
        return " or ".join(_type_label(branch) for branch in schema)
    if isinstance(schema, dict) and schema.get("type") == "enum":
        return f"enum {schema['name']} ({', '.join(schema['symbols'])})"
    if isinstance(schema, dict):
        return str(schema.get("name") or schema.get("type"))
    return str(schema)


def _validation_reason(exc: ValidationError) -> str:
    expected: dict[str, list[str]] = {}
    got: dict[str, Any] = {}
    for error in exc.errors:  # a union gives one error per branch: merge them
        where = error.field or "value"
        expected.setdefault(where, []).append(_type_label(error.schema))
        got.setdefault(where, error.datum)
    parts = []
    for where, types in expected.items():
        datum = got[where]
        shown = "missing or null" if datum is None else f"{datum!r:.60} ({type(datum).__name__})"
        parts.append(f"{where} is {shown}, expected {' or '.join(dict.fromkeys(types))}")
    return "; ".join(parts)
