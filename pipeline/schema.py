"""Avro schemas: the schema store and the single-object codec.

Records travel in Avro single-object encoding: ``C3 01``, the schema's 8-byte CRC-64-AVRO
fingerprint (little-endian, as the Avro spec mandates), then the schemaless Avro body. A reader
finds the writer's schema by that fingerprint and resolves it against its own only when the two
differ. fastavro encodes and decodes (compatibility checks: :mod:`pipeline.compat`). Library errors
are translated here into :class:`~pipeline.errors.SchemaError` and its kin.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Final

import avro.constants
import avro.schema as avsc
from fastavro import schemaless_reader, schemaless_writer
from fastavro.schema import UnknownType, fingerprint, parse_schema, to_parsing_canonical_form
from fastavro.validation import ValidationError, validate

from pipeline.errors import DecodeError, EncodeError, SchemaError

__all__ = ["HEADER_SIZE", "MAGIC", "Codec", "Schema", "SchemaStore"]

MAGIC: Final = b"\xc3\x01"  # opens every single-object encoded record
HEADER_SIZE: Final = 10  # MAGIC + 8-byte fingerprint; the Avro body starts here

_NAMED: Final = frozenset(avro.constants.NAMED_TYPES)
_PRIMITIVES: Final = frozenset(avro.constants.PRIMITIVE_TYPES)


@dataclass(frozen=True, slots=True)
class Schema:
    """One parsed Avro schema and its single-object fingerprint.

    Attributes:
        name: The full name of a named type (``com.example.Order``), the type name of a
            primitive, the Parsing Canonical Form of an anonymous array, map or union.
        raw: The schema as given (decoded JSON: dict, list or type name).
        parsed: fastavro's parsed form, self-contained (referenced named types inlined).
        fingerprint: CRC-64-AVRO of the Parsing Canonical Form, little-endian (wire order).
        source: The file the schema came from, if any.

    Example:
        >>> s = Schema.from_json('"int"')
        >>> s.name, s.fingerprint.hex()
        ('int', '8f5c393f1ad57572')
    """

    name: str
    raw: Any = field(repr=False)
    parsed: Any = field(repr=False, compare=False)
    fingerprint: bytes
    source: Path | None = field(default=None, compare=False)

    def __hash__(self) -> int:
        return hash((self.name, self.fingerprint))

    @classmethod
    def from_json(
        cls, obj: Any, source: Path | None = None, named: Mapping[str, Any] | None = None
    ) -> Schema:
        """Build a schema from decoded JSON, JSON text, or a bare type name like ``int``.

        Args:
            obj: The schema.
            source: The file it came from, named in error messages.
            named: fastavro named types (full name -> definition) ``obj`` may refer to; not
                modified.

        Raises:
            SchemaError: The JSON or the Avro schema is malformed.
        """
        return _build(obj, source, named)[0]


def _where(source: Path | None) -> str:
    return f"{source}: " if source is not None else ""


def _decode_json(obj: Any, source: Path | None, *, text: bool = False) -> Any:
    # A string is JSON text unless it is a bare type name, which cannot start like JSON.
    if not text and (not isinstance(obj, str) or obj.lstrip()[:1] not in ("{", "[", '"')):
        return obj
    try:
        return json.loads(obj)
    except json.JSONDecodeError as exc:
        raise SchemaError(
            f"{_where(source)}invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc


def _fastavro_reason(exc: Exception) -> str:
    if isinstance(exc, UnknownType):
        return f"unknown type '{exc.name}'"
    if isinstance(exc, KeyError):
        return f"missing required attribute '{exc.args[0]}'"
    return str(exc) or type(exc).__name__


def _self_contained(node: Any, named: Mapping[str, Any], seen: set[str]) -> Any:
    """Copy a parsed schema, defining each named type at its first use (as Avro requires)."""
    if isinstance(node, str):
        known = node in named and node not in seen
        return _self_contained(named[node], named, seen) if known else node
    if isinstance(node, list):
        return [_self_contained(branch, named, seen) for branch in node]
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items() if not k.startswith("__")}
    kind = out.get("type")
    if kind in _NAMED:
        if out["name"] in seen:
            return out["name"]
        seen.add(out["name"])
        if kind in ("record", "error"):
            out["fields"] = [
                {**f, "type": _self_contained(f["type"], named, seen)} for f in out["fields"]
            ]
    elif kind in ("array", "map"):
        key = "items" if kind == "array" else "values"
        out[key] = _self_contained(out[key], named, seen)
    elif kind is not None:
        out["type"] = _self_contained(kind, named, seen)
    return out


def _avro_parse(full: Any) -> avsc.Schema:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unknown logicalType is legal: it reads as its base
        return avsc.parse(json.dumps(full))


def _build(
    obj: Any, source: Path | None, named: Mapping[str, Any] | None
) -> tuple[Schema, dict[str, Any]]:
    """Parse one schema against known named types; return it and the named types after it."""
    where = _where(source)
    raw = _decode_json(obj, source)
    if not isinstance(raw, (str, list, dict)):
        raise SchemaError(
            f"{where}invalid Avro schema: expected a JSON object, array or type name, "
            f"got {type(raw).__name__}"
        )
    trial: dict[str, Any] = dict(named or {})  # fastavro fills it even when parsing fails
    try:
        tree = parse_schema(raw, named_schemas=trial)
    except Exception as exc:
        raise SchemaError(f"{where}invalid Avro schema: {_fastavro_reason(exc)}") from exc
    # The canonical form (so the fingerprint) must inline referenced types, as Java does.
    full = _self_contained(tree, trial, set())
    try:
        _avro_parse(full)  # fastavro lets duplicate fields and bad names pass; avro does not
        parsed = parse_schema(full, named_schemas={})
        canonical = to_parsing_canonical_form(full)
    except Exception as exc:
        raise SchemaError(f"{where}invalid Avro schema: {exc}") from exc
    kind = tree.get("type") if isinstance(tree, dict) else tree
    if isinstance(tree, dict) and isinstance(kind, str) and kind in _NAMED:
        name = str(tree["name"])
    elif isinstance(kind, str) and (kind in _PRIMITIVES or kind is tree):
        name = kind  # a primitive, or a reference to a named type
    else:
        name = canonical  # arrays, maps and unions have no name of their own
    # fastavro gives the CRC-64-AVRO hex in little-endian byte order, which is the wire order.
    fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
    return Schema(name, raw, parsed, fp, source), trial


class SchemaStore:
    """Every schema a pipeline knows, by full name and by fingerprint.

    Adding a schema under a name already known adds a new version: :meth:`get` returns the
    latest, while :meth:`by_fingerprint` still finds every version (to read old data).

    Example:
        >>> store = SchemaStore()
        >>> _ = store.add({"type": "record", "name": "com.example.Ping",
        ...                "fields": [{"name": "n", "type": "int"}]})
        >>> codec = store.codec("com.example.Ping")
        >>> codec.decode(codec.encode({"n": 7}))
        {'n': 7}
    """

    __slots__ = ("_by_fp", "_by_name", "_named")

    def __init__(self) -> None:
        self._named: dict[str, Any] = {}
        self._by_name: dict[str, Schema] = {}
        self._by_fp: dict[bytes, Schema] = {}

    @classmethod
    def from_directory(cls, path: str | Path) -> SchemaStore:
        """Load every ``*.avsc`` under ``path``; files may use types defined in other files.

        Raises:
            SchemaError: A file is unreadable or malformed, two files define one name
                differently, or a referenced type is defined nowhere.
        """
        root = Path(path)
        if not root.is_dir():
            raise SchemaError(f"{root}: schema directory not found")
        pending: list[tuple[Path, Any]] = []
        for file in sorted(root.rglob("*.avsc")):
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise SchemaError(f"{file}: cannot read schema file: {exc}") from exc
            if not text.strip():
                raise SchemaError(f"{file}: empty schema file")
            pending.append((file, _decode_json(text, file, text=True)))
        store = cls()
        owners: dict[str, Schema] = {}
        while pending:
            deferred: list[tuple[Path, Any, SchemaError]] = []
            for file, raw in pending:
                try:
                    store._add(raw, file, owners)
                except SchemaError as exc:
                    if not isinstance(exc.__cause__, UnknownType):
                        raise
                    deferred.append((file, raw, exc))  # may be defined in a file not yet loaded
            if len(deferred) == len(pending):
                first = deferred[0][2]
                raise SchemaError(
                    f"{first.message} (not defined by any .avsc file in {root})"
                ) from first.__cause__
            pending = [(file, raw) for file, raw, _ in deferred]
        return store

    def add(self, schema_json: Any, source: Path | None = None) -> Schema:
        """Add a schema (decoded JSON, JSON text or type name) and return it.

        Named types defined inside it are added too; later schemas may refer to them.

        Raises:
            SchemaError: The schema is malformed or refers to an unknown type.
        """
        return self._add(schema_json, source, None)

    def _add(self, obj: Any, source: Path | None, owners: dict[str, Schema] | None) -> Schema:
        top, trial = _build(obj, source, self._named)
        defined = [n for n, d in trial.items() if self._named.get(n) is not d]
        added = [top] + [_build(trial[n], source, trial)[0] for n in defined if n != top.name]
        for schema in added:
            other = schema if owners is None else owners.setdefault(schema.name, schema)
            if other.fingerprint != schema.fingerprint:  # one directory, two definitions
                where = _where(source)
                raise SchemaError(f"{where}redefines {schema.name} differently from {other.source}")
        self._named.update((n, trial[n]) for n in defined)
        for schema in added:
            self._by_name[schema.name] = self._by_fp[schema.fingerprint] = schema
        return top

    def get(self, full_name: str) -> Schema:
        """Return the latest schema named ``full_name``.

        Raises:
            SchemaError: No schema has that name; the message lists the known names.
        """
        try:
            return self._by_name[full_name]
        except KeyError:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise SchemaError(f"unknown schema {full_name!r}; known schemas: {known}") from None

    def by_fingerprint(self, fp: bytes) -> Schema | None:
        """Return the schema with this 8-byte wire fingerprint, or None."""
        return self._by_fp.get(bytes(fp))

    def names(self) -> list[str]:
        """Return the names of all schemas, sorted."""
        return sorted(self._by_name)

    def codec(self, full_name: str, *, validate_on_encode: bool = False) -> Codec:
        """Return a codec that writes, and reads as, the schema ``full_name``.

        Raises:
            SchemaError: No schema has that name.
        """
        return Codec(self.get(full_name), self, validate_on_encode=validate_on_encode)


class Codec:
    """Encodes and decodes Avro single-object records for one (reader) schema.

    Not thread-safe: it reuses one write buffer. Use one codec per worker.

    Args:
        schema: The schema values are written with and read as.
        store: Where writer schemas are found by fingerprint when decoding.
        validate_on_encode: Check each value before writing it. fastavro's writer is lenient
            (it writes ``1.5`` as ``1`` and an ``int`` beyond 32 bits); validating catches
            that, but roughly triples the cost of encoding.

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
        self._buffer = BytesIO(MAGIC + schema.fingerprint)  # the header stays; bodies follow

    def encode(self, value: Any) -> bytes:
        """Return ``value`` as single-object encoded bytes.

        Raises:
            EncodeError: The value does not match the schema; the message says where.
        """
        if self._check and (reason := self.validate(value)) is not None:
            raise EncodeError(f"value does not match {self.schema.name}: {reason}")
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
