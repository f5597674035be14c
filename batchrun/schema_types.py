"""JSON Schema → Arrow: the typed column each top-level property of an output schema becomes, and the
converter that turns a (schema-valid) value into what that column holds. Used by the request builder
(to check a schema up front), the result parser (a value that cannot fill its column is
`invalid_output`) and the output writer; it depends on none of them. And `schema_problem`: whether a
job's schema can be used at all (the spec checks it when the job is loaded).
"""
from __future__ import annotations

import json
from typing import Any, Optional

import pyarrow as pa


def schema_validator() -> type:
    """The validator class replies are validated with (jsonschema's Draft 2020-12); the job's schema is checked
    against its meta-schema before sending. jsonschema is imported on first use (~0.05 s): a job without an
    output schema never needs it."""
    import jsonschema
    return jsonschema.Draft202012Validator


def best_match(errors) -> Any:
    """jsonschema's best_match: the most relevant of a validation's errors (None: valid)."""
    import jsonschema
    return jsonschema.exceptions.best_match(errors)


def column_for(schema: Any, root: Any = None) -> tuple:
    """(Arrow type, convert) for the values a JSON Schema admits.

    integer → int64, number → float64, boolean → bool, string → string, an array → a list of its
    items' type, an object with properties → a struct; an enum or const follows its values (all
    whole numbers → int64, all numbers → float64, all strings → string, all booleans → bool); a
    nullable type (`["string", "null"]`, an anyOf with {"type": "null"}) is its other type; a union
    (type lists, anyOf, oneOf) is its branches' common type (int64 with float64 → float64). Anything
    else — mixed unions or enums, objects without properties, arrays without items, empty schemas —
    is a string column holding each value as JSON text.

    `convert(value)` turns one (schema-valid) value into what the column holds, and raises
    ColumnError when it cannot (e.g. 2**70 in an int64 column): the result parser turns that into
    `invalid_output`, so the writer only ever sees values that fit.
    """
    typ, convert, _ = _column(schema, schema if root is None else root)
    return typ, convert


def _column(schema: Any, root: Any, refs: tuple = ()) -> tuple:
    """(Arrow type, convert, shape): `shape` tells apart columns of the same Arrow type whose values
    differ (a string column and a column of JSON text). `refs`: the $refs being expanded (a
    recursive schema becomes JSON text where it recurses)."""
    if not isinstance(schema, dict):
        return _JSON
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = None if ref in refs else resolve_ref(root, ref)
        return _JSON if target is None else _column(target, root, (*refs, ref))
    for key in ("enum", "const"):
        if key in schema:
            values = schema[key] if key == "enum" else [schema[key]]
            return _literal_column(values) if isinstance(values, list) else _JSON
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            branches = [b for b in schema[key] if not (isinstance(b, dict) and b.get("type") == "null")]
            return _union([_column(b, root, refs) for b in branches])
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) == 1 and len(schema) == 1:
        return _column(schema["allOf"][0], root, refs)
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        return _union([_column({**schema, "type": k}, root, refs) for k in kinds])
    if kind is None and "allOf" not in schema:
        kind = "object" if "properties" in schema else "array" if "items" in schema else None
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array" and isinstance(schema.get("items"), dict):
        item_type, convert_item, shape = _column(schema["items"], root, refs)
        return pa.list_(item_type), _list_converter(convert_item), ("list", shape)
    if kind == "object" and isinstance(schema.get("properties"), dict) and schema["properties"]:
        fields = [(name, *_column(sub, root, refs)) for name, sub in schema["properties"].items()]
        return (pa.struct([pa.field(name, typ) for name, typ, _, _ in fields]), _struct_converter(fields),
                ("struct", tuple((name, shape) for name, _, _, shape in fields)))
    return _JSON


def resolve_ref(root: Any, ref: str) -> Any:
    if not ref.startswith("#"):
        return None
    node = root
    for part in ref[1:].split("/"):
        if part:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
    return node


def _literal_column(values: list) -> tuple:
    values = [v for v in values if v is not None]
    if values and all(isinstance(v, bool) for v in values):
        return _SCALARS["boolean"]
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return _SCALARS["integer"]
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return _SCALARS["number"]
    if values and all(isinstance(v, str) for v in values):
        return _SCALARS["string"]
    return _JSON


def _union(columns: list) -> tuple:
    """The one column of several alternatives: their common type, else JSON text."""
    if not columns:
        return _JSON
    shapes = {shape for _, _, shape in columns}
    if len(shapes) == 1:
        return columns[0]
    if shapes == {"integer", "number"}:
        return _SCALARS["number"]
    return _JSON


class ColumnError(ValueError):
    """A value that does not fit its column; `path` is where in the value (list indexes, field names)."""

    def __init__(self, reason: str, path: tuple = ()):
        super().__init__(reason)
        self.reason, self.path = reason, path

    def within(self, step: Any) -> "ColumnError":
        return ColumnError(self.reason, (step, *self.path))


def _to_string(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    raise ColumnError(f"expected a string, got {_json(value)[:60]}")


def _to_int(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ColumnError(f"expected a whole number, got {_json(value)[:60]}")
    if not -2 ** 63 <= value < 2 ** 63:
        raise ColumnError(f"{_json(value)[:60]} does not fit a 64-bit integer column")
    return value


def _to_float(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ColumnError(f"expected a number, got {_json(value)[:60]}")
    try:
        return float(value)
    except OverflowError:
        raise ColumnError(f"{_json(value)[:60]} does not fit a 64-bit float column") from None


def _to_bool(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    raise ColumnError(f"expected true or false, got {_json(value)[:60]}")


def _json(value: Any) -> Any:
    return None if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True)


def _list_converter(convert_item):
    def convert(value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, list):
            raise ColumnError(f"expected a list, got {_json(value)[:60]}")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(convert_item(item))
            except ColumnError as exc:
                raise exc.within(i) from None
        return out
    return convert


def _struct_converter(fields: list):
    def convert(value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ColumnError(f"expected an object, got {_json(value)[:60]}")
        out = {}
        for name, _, convert_field, _ in fields:
            try:
                out[name] = convert_field(value.get(name))
            except ColumnError as exc:
                raise exc.within(name) from None
        return out
    return convert


_SCALARS = {"string": (pa.string(), _to_string, "string"), "integer": (pa.int64(), _to_int, "integer"),
            "number": (pa.float64(), _to_float, "number"), "boolean": (pa.bool_(), _to_bool, "boolean")}
_JSON = (pa.string(), _json, "json")   # a column of JSON text


def schema_columns(output_schema: Optional[dict]) -> list[tuple[str, pa.DataType]]:
    return [(name, typ) for name, typ, _ in schema_converters(output_schema)]


def schema_converters(output_schema: Optional[dict]) -> list[tuple]:
    """(name, Arrow type, convert) for each top-level property of the output schema."""
    if not output_schema:
        return []
    return [(name, *column_for(sub, output_schema))
            for name, sub in (output_schema.get("properties") or {}).items()]


def schema_problem(schema: dict) -> Optional[str]:
    """What makes `schema` unusable as an output schema, naming where in it; None when it is fine.

    Checked with the validator class replies are checked with, so a schema that passes here never
    fails while results are read (after they were paid for).
    """
    validator = schema_validator()
    meta = validator(validator.META_SCHEMA, format_checker=validator.FORMAT_CHECKER)
    error = best_match(meta.iter_errors(schema))   # as check_schema, with the path
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        message = error.message
        if error.absolute_path and error.absolute_path[-1] == "type" and error.validator == "anyOf":
            message = (f"{error.instance!r} is not a JSON Schema type (use string, integer, number, boolean, "
                       "array, object or null)")
        return f"not a valid JSON Schema at {where}: {message}"
    for where, ref in _refs(schema, ()):
        if not ref.startswith("#"):
            return f"$ref {ref!r} at {where}: only references inside the schema (#/...) can be used"
        if not isinstance(resolve_ref(schema, ref), (dict, bool)):
            return f"$ref {ref!r} at {where}: the schema has nothing there"
    return None


def _refs(node: Any, path: tuple):
    """(where, ref) of every $ref in a schema."""
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield "/".join(map(str, path)) or "(root)", node["$ref"]
        for key, value in node.items():
            if key not in ("enum", "const", "default", "examples"):
                yield from _refs(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _refs(value, (*path, i))
