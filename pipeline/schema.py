"""Avro schemas: parsed once, found by full name or by single-object fingerprint.

A schema's fingerprint is the CRC-64-AVRO of its Parsing Canonical Form (little-endian, as the
Avro spec mandates); :mod:`pipeline.codec` writes it in front of every record and reads it back
to find the writer's schema; :mod:`pipeline.compat` checks reader/writer compatibility. Library
errors are translated here into :class:`~pipeline.errors.SchemaError`."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import avro.constants
import avro.schema as avsc
from fastavro.schema import UnknownType, fingerprint, parse_schema, to_parsing_canonical_form

from pipeline.codec import HEADER_SIZE, MAGIC, Codec
from pipeline.errors import SchemaError

__all__ = ["HEADER_SIZE", "MAGIC", "Codec", "Schema", "SchemaStore"]


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
