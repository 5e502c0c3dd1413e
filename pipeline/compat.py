"""Reader/writer schema compatibility: can data written with one schema be read as another?

The ``avro`` package's reference checker decides; this module turns its verdict into a
:class:`~pipeline.errors.SchemaCompatibilityError` that names both sides and every offending
field, as the DSL reports a mismatch between two stages.
"""

from __future__ import annotations

from typing import Any

import avro.compatibility as compat
import avro.schema as avsc

from pipeline.errors import SchemaCompatibilityError, SchemaError
from pipeline.schema import Schema, _avro_parse, _self_contained

__all__ = ["check_compatible"]


def check_compatible(
    writer: Schema, reader: Schema, *, writer_label: str, reader_label: str
) -> None:
    """Check that data written with ``writer`` can be read as ``reader``.

    Args:
        writer: The schema the producing side writes.
        reader: The schema the consuming side reads as.
        writer_label: Names the producing side in the message, e.g. ``stage 'enrich'``.
        reader_label: Names the consuming side, e.g. ``stage 'price'``.

    Raises:
        SchemaCompatibilityError: The reader cannot read the writer's data; the message names
            both sides and every offending field.
    """
    if writer.fingerprint == reader.fingerprint:
        return
    checker = compat.ReaderWriterCompatibilityChecker()  # type: ignore[no-untyped-call]
    problems = _explain(checker, _to_avro(reader), _to_avro(writer), "", set())
    if problems:
        raise SchemaCompatibilityError(
            f"{writer_label} writes {writer.name}, which {reader_label} cannot read as "
            f"{reader.name}: {'; '.join(problems)}"
        )


def _to_avro(schema: Schema) -> avsc.Schema:
    parsed = schema.parsed
    named = parsed.get("__named_schemas", {}) if isinstance(parsed, dict) else {}
    try:
        return _avro_parse(_self_contained(parsed, named, set()))
    except Exception as exc:  # pragma: no cover - every Schema passed this parser once
        raise SchemaError(f"{schema.name}: invalid Avro schema: {exc}") from exc


def _at(path: str, reason: str) -> str:
    return f"field '{path}' ({reason})" if path else reason


def _label(schema: avsc.Schema) -> str:
    return schema.fullname if isinstance(schema, avsc.NamedSchema) else schema.type


def _explain(
    checker: compat.ReaderWriterCompatibilityChecker,
    reader: avsc.Schema,
    writer: avsc.Schema,
    path: str,
    visiting: set[tuple[int, int]],
) -> list[str]:
    """Say, field by field, why ``reader`` cannot read ``writer`` (nothing if it can)."""
    result = checker.get_compatibility(reader, writer)
    incompatible = compat.SchemaCompatibilityType.incompatible
    if result.compatibility is not incompatible or (id(reader), id(writer)) in visiting:
        return []
    visiting.add((id(reader), id(writer)))  # recursive types
    problems: list[str] = []
    if isinstance(reader, avsc.RecordSchema) and isinstance(writer, avsc.RecordSchema):
        renamed = not compat.schema_name_equals(reader, writer)
        for reader_field in reader.fields:
            where = f"{path}.{reader_field.name}" if path else reader_field.name
            writer_field = compat.lookup_writer_field(writer, reader_field)
            if writer_field is not None:
                problems += _explain(checker, reader_field.type, writer_field.type, where, visiting)
            elif not reader_field.has_default:
                problems.append(_at(where, "reader field without default missing in writer"))
        if renamed:
            # An alias fixes a name only: hint it when the fields would read, else just say
            # that the types differ (the field problems say how).
            problems.insert(0, _at(path, _name_mismatch(reader, writer, hint=not problems)))
    elif isinstance(reader, avsc.UnionSchema) or isinstance(writer, avsc.UnionSchema):
        readers = reader.schemas if isinstance(reader, avsc.UnionSchema) else [reader]
        for branch in writer.schemas if isinstance(writer, avsc.UnionSchema) else [writer]:
            verdicts = (checker.get_compatibility(r, branch).compatibility for r in readers)
            if all(verdict is incompatible for verdict in verdicts):
                twin = next((r for r in readers if _label(r) == _label(branch)), None)
                if twin is not None:  # the same type, evolved: say what changed inside it
                    problems += _explain(checker, twin, branch, path, visiting)
                else:
                    problems.append(_at(path, f"reader has no union branch for {_label(branch)}"))
    return problems or [_at(path, _leaf_reason(result, reader, writer))]


def _name_mismatch(reader: avsc.NamedSchema, writer: avsc.NamedSchema, *, hint: bool = True) -> str:
    told = f"reader type {reader.fullname} does not match writer type {writer.fullname}"
    if not hint:
        return told
    return f'{told}; add "aliases": ["{writer.fullname}"] to the reader'


def _leaf_reason(result: compat.SchemaCompatibilityResult, reader: Any, writer: Any) -> str:
    named = isinstance(reader, avsc.NamedSchema) and isinstance(writer, avsc.NamedSchema)
    if named and reader.type == writer.type and not compat.schema_name_equals(reader, writer):
        return _name_mismatch(reader, writer)
    if isinstance(reader, avsc.EnumSchema) and isinstance(writer, avsc.EnumSchema):
        missing = sorted(set(writer.symbols) - set(reader.symbols))
        return f"writer enum symbols missing in reader: {', '.join(missing)}"
    if isinstance(reader, avsc.FixedSchema) and isinstance(writer, avsc.FixedSchema):
        return f"fixed size {writer.size} in writer, {reader.size} in reader"
    return "; ".join(sorted(result.messages))
