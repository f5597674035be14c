"""Issue 5: output schemas — checked before sending, sent as the official SDK sends them, each
top-level property a typed column, and every reply that cannot fill its columns an `invalid_output`."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from anthropic import transform_schema

from batchrun.errors import InputError
from batchrun.models import load_catalog
from batchrun.schema_types import column_for
from batchrun.requests import api_schema
from batchrun.results import ResultParser
from batchrun.spec import JobSpec

OBJ = {"type": "object", "properties": {"a": {"type": "integer"}}}


# ------------------------------------------------------------------------------ JSON Schema → Arrow

@pytest.mark.parametrize("schema,arrow", [
    ({"type": "string"}, pa.string()),
    ({"type": "integer"}, pa.int64()),
    ({"type": "number"}, pa.float64()),
    ({"type": "boolean"}, pa.bool_()),
    ({"type": "array", "items": {"type": "number"}}, pa.list_(pa.float64())),
    ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "object", "properties": {
        "c": {"type": "boolean"}}}}}, pa.struct([("a", pa.int64()), ("b", pa.struct([("c", pa.bool_())]))])),
    ({"type": "array", "items": OBJ}, pa.list_(pa.struct([("a", pa.int64())]))),
    ({"enum": ["a", "b"]}, pa.string()),                                   # an enum without a type
    ({"enum": [1, 2, 3]}, pa.int64()),
    ({"enum": [1, 2.5]}, pa.float64()),
    ({"enum": [True, False]}, pa.bool_()),
    ({"enum": ["a", 1]}, pa.string()),                                     # mixed: JSON text
    ({"const": 7}, pa.int64()),
    ({"type": "array", "items": {"enum": [1, 2, 3]}}, pa.list_(pa.int64())),
    ({"type": ["string", "null"]}, pa.string()),                           # nullable types
    ({"type": ["integer", "null"]}, pa.int64()),
    ({"type": ["integer", "number"]}, pa.float64()),
    ({"anyOf": [{"type": "number"}, {"type": "null"}]}, pa.float64()),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, pa.float64()),
    ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, pa.string()),  # a union: JSON text
    ({"type": "object"}, pa.string()),                                     # no properties: JSON text
    ({"type": "array"}, pa.string()),
    ({}, pa.string()),
])
def test_arrow_type_of_a_schema(schema, arrow):
    assert column_for(schema)[0] == arrow


@pytest.mark.parametrize("schema,value,held", [
    ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, "a", '"a"'),   # JSON text: every value as JSON
    ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, 5, "5"),
    ({"type": "object"}, {"k": [1]}, '{"k": [1]}'),
    ({"type": "integer"}, 5.0, 5),                                         # JSON Schema's integer includes 5.0
    ({"type": ["number", "null"]}, 3, 3.0),
    ({"type": "array", "items": OBJ}, [{"a": 1, "extra": 2}], [{"a": 1}]),
])
def test_values_as_their_columns_hold_them(schema, value, held):
    assert column_for(schema)[1](value) == held


def test_a_recursive_schema_becomes_json_where_it_recurses():
    schema = {"$defs": {"node": {"type": "object", "properties": {
        "name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
        "$ref": "#/$defs/node"}
    assert column_for(schema)[0] == pa.struct([("name", pa.string()), ("children", pa.list_(pa.string()))])


# ------------------------------------------------------------------------------ replies that cannot be kept

def parser(schema):
    return ResultParser(load_catalog(), "claude-haiku-4-5", schema=schema, batch=True, cache_ttl="5m")


def reply(text):
    return {"type": "succeeded", "message": {"content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                                             "usage": {"input_tokens": 10, "output_tokens": 5}}}


@pytest.mark.parametrize("props,text,where", [
    ({"n": {"type": "integer"}}, '{"n": 100000000000000000000000}', "n"),          # too big for int64
    ({"n": {"type": "number"}}, '{"n": 1' + "0" * 400 + "}", "n"),                  # too big for float64
    ({"s": {"type": "array", "items": {"type": "integer", "minimum": 0}}}, '{"s": [1, 1e20]}', "s/1"),
    ({"o": {"type": "object", "properties": {"v": {"type": "integer"}}}}, '{"o": {"v": 2e19}}', "o/v"),
])
def test_valid_reply_that_cannot_fill_its_column_is_invalid_output(props, text, where):
    fields = parser({"type": "object", "properties": props}).parse(reply(text))
    assert fields["state"] == "invalid_output" and fields["parsed"] is None
    assert f"at {where} does not fit column" in fields["error_message"]
    assert fields["text"] == text                                               # the raw reply kept


def test_a_reply_that_is_not_an_object_is_invalid_output():
    fields = parser({"properties": {"a": {"type": "string"}}}).parse(reply("[1, 2]"))   # no "type": object
    assert fields["state"] == "invalid_output" and "JSON object" in fields["error_message"]


def test_a_reply_that_fits_is_kept():
    fields = parser({"type": "object", "properties": {"scores": {"type": "array", "items": {"enum": [1, 2, 3]}}}}
                    ).parse(reply('{"scores": [3, 1]}'))
    assert fields["state"] == "succeeded" and json.loads(fields["parsed"]) == {"scores": [3, 1]}


# ------------------------------------------------------------------------------ what is sent

SDK_CASES = [
    {"type": "object", "properties": {"label": {"type": "string", "enum": ["a", "b"]}}, "required": ["label"]},
    {"type": "object", "description": "Row", "properties": {
        "a": {"type": "integer", "minimum": 1, "maximum": 10, "description": "A number"},
        "b": {"type": "string", "format": "email"},
        "c": {"type": "string", "format": "phone", "pattern": "^x", "maxLength": 9},
        "d": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 5, "uniqueItems": True},
        "e": {"type": "array", "items": {"type": "boolean"}, "minItems": 1},
        "f": {"oneOf": [{"type": "string"}, {"type": "null"}]},
        "g": {"type": "object", "properties": {"h": {"type": "number", "exclusiveMinimum": 0}},
              "required": ["h"], "additionalProperties": True},
        "i": {"enum": [1, 2, 3]}, "j": {"const": "x"}, "k": {"$ref": "#/$defs/k"},
        "l": {"allOf": [{"type": "object", "properties": {"m": {"type": "string"}}}]},
        "n": {"type": "number", "multipleOf": 0.5, "default": 1}},
     "$defs": {"k": {"type": "object", "properties": {"z": {"type": "boolean"}}}}, "required": ["a"]},
]


@pytest.mark.parametrize("schema", SDK_CASES)
def test_schema_sent_as_the_official_sdk_sends_it(schema):
    assert api_schema(schema) == transform_schema(schema)


def test_schema_sent_for_the_ready_label_job_is_the_sdks():
    spec = JobSpec.load(str(Path(__file__).resolve().parent.parent / "jobs" / "label-tickets.toml"))
    assert api_schema(spec.output_schema) == transform_schema(spec.output_schema)


def test_type_lists_the_sdk_cannot_send_become_any_of():
    schema = {"type": "object", "properties": {"n": {"type": ["string", "null"], "maxLength": 5, "description": "d"}}}
    with pytest.raises(AssertionError):   # the SDK gives up on a type list
        transform_schema(schema)
    assert api_schema(schema)["properties"]["n"] == {
        "description": "d", "anyOf": [{"type": "string", "description": "{maxLength: 5}"}, {"type": "null"}]}


def test_a_subschema_without_a_type_is_refused_by_name():
    with pytest.raises(InputError, match=r"output_schema/properties/x: needs a 'type'"):
        api_schema({"type": "object", "properties": {"x": {"description": "anything"}}})
    # …unless its keywords say what it is
    assert api_schema({"properties": {"x": {"type": "string"}}})["type"] == "object"


# ------------------------------------------------------------------------------ checked before sending

def spec_with(**keys):
    return JobSpec.from_mapping({"input": "in.csv", "prompt": "{{ a }}", **keys})


@pytest.mark.parametrize("schema,needle", [
    ({"type": "object", "properties": {"x": {"type": "strng"}}}, "at properties/x/type: 'strng' is not a JSON Schema type"),
    ({"type": "object", "properties": {"x": {"type": "integer", "minimum": "1"}}}, "at properties/x/minimum"),
    ({"type": "object", "properties": {"x": {"type": "string", "pattern": "(["}}}, "at properties/x/pattern"),
    ({"type": "object", "properties": {"x": {"$ref": "#/$defs/nope"}}}, "'#/$defs/nope' at properties/x"),
    ({"type": "object", "properties": {"x": {"$ref": "https://example.com/s.json"}}}, "only references inside"),
])
def test_a_bad_json_schema_is_refused_naming_where(schema, needle):
    with pytest.raises(InputError) as info:
        spec_with(output_schema=schema)
    assert str(info.value).startswith("output_schema: ") and needle in str(info.value)


@pytest.mark.parametrize("metadata,needle", [
    ({"team": "a", "user_id": "u"}, "unknown key 'team'"),
    ({"user_id": 5}, "user_id must be a string"),
    ({"user_id": "x" * 257}, "at most 256"),
])
def test_metadata_takes_only_a_user_id(metadata, needle):
    with pytest.raises(InputError, match=needle):
        spec_with(metadata=metadata)
    spec_with(metadata={"user_id": "team-a"})
    spec_with(metadata={"user_id": None})


def test_prefill_with_a_schema_or_trailing_whitespace_is_refused():
    with pytest.raises(InputError, match="prefill: cannot be used with labels"):
        spec_with(prefill="{", labels=["a", "b"])
    with pytest.raises(InputError, match="prefill: cannot be used with output_schema"):
        spec_with(prefill="{", output_schema=OBJ)
    with pytest.raises(InputError, match="prefill: must not end with whitespace"):
        spec_with(prefill="The answer is ")
