"""From one input row to one Messages request: the params, the custom_id, the request's identity.

The prompt is rendered by templates.PromptTemplate; this module builds the params around it (system
prompt, cache breakpoints, few-shot turns, images, structured output) and checks them against the
model before anything is sent.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import pyarrow as pa
import pyarrow.compute as pc

from .errors import InputError
from .models import ModelInfo, check_params, thinking_on
from .spec import DEFAULT_API_VERSION, JobSpec
from .plain import MARK, PlainBodies
from .templates import MAX_PROMPT, NullCell, PromptTemplate, as_written, render_parts

CUSTOM_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
OUTPUT_TOOL = "record_output"


def custom_id_for(value: Any) -> str:
    """The custom_id for an id cell: the value itself when the API accepts it, else a stable hash."""
    text = value if isinstance(value, str) else str(value)
    if CUSTOM_ID_RE.match(text):
        return text
    return "h-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]


def custom_ids(column: pa.Array) -> Optional[list]:
    """custom_id_for of every cell of an id column (as written) at once, when each is its own custom_id
    (CUSTOM_ID_RE, found by pyarrow); None when one is not (empty, null, or hashed): one by one, then."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)) or column.null_count:
        return None
    if pc.match_substring_regex(column, CUSTOM_ID_RE.pattern).true_count != len(column):
        return None
    return column.to_pylist()


def new_job_tag() -> str:
    """A job's tag: 10 random hex digits, kept in its state file and sent in every custom_id of its
    batches, so that a batch found after a lost create reply can be proved to be this job's."""
    import secrets
    return secrets.token_hex(5)


def wire_id(tag: Optional[str], custom_id: str) -> str:
    """The custom_id a request is sent with: `<tag>-<custom_id>`, or `<tag>_<digest>` when that would be
    longer than the API's 64 characters; the custom_id itself for a batch sent without a tag."""
    if tag is None:
        return custom_id
    wire = f"{tag}-{custom_id}"
    if len(wire) <= 64:
        return wire
    return f"{tag}_" + hashlib.sha256(custom_id.encode("utf-8")).hexdigest()[:64 - len(tag) - 1]


# json.dumps with these arguments would build a new encoder on every call (the plan calls it once a row)
_CANONICAL = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode
_STRING = json.encoder.encode_basestring   # (the encoder's own for strings when ensure_ascii is off)


def canonical_json(obj: Any) -> str:
    """Sorted keys, no spaces, UTF-8 text as is: the text every request hash is taken of.

    The common row part, {"messages": [{"content": str, "role": str}, ...]}, is written directly (half
    the encoder's time, twice per row sent: plan and submit); the same text as the encoder's (tested)."""
    if type(obj) is dict and len(obj) == 1:
        messages = obj.get("messages")
        if type(messages) is list:
            out = []
            for m in messages:
                if type(m) is not dict or len(m) != 2:
                    break
                content, role = m.get("content"), m.get("role")
                if type(content) is not str or type(role) is not str:
                    break
                out.append('{"content":' + _STRING(content) + ',"role":' + _STRING(role) + "}")
            else:
                return '{"messages":[' + ",".join(out) + "]}"
    return _CANONICAL(obj)


def params_hash(body: str, shared_hash: str = "") -> str:
    """The identity of one request: its row part hashed with the hash of the job's shared part.

    Two requests with the same shared params and the same row part — in any job — hash the same,
    so an answer already paid for is found again.
    """
    return hashlib.sha256((shared_hash + body).encode("utf-8")).hexdigest()


def params_hasher(shared_hash: str) -> Callable[[str], str]:
    """params_hash(body, shared_hash) for the bodies of one job: the shared part hashed once."""
    start = hashlib.sha256(shared_hash.encode("utf-8"))

    def hash_(body: str) -> str:
        h = start.copy()
        h.update(body.encode("utf-8"))
        return h.hexdigest()
    return hash_


def answer_scope(endpoint: Optional[str], api_version: str) -> str:
    """What an answer belongs to besides its params: the service that gave it (`api.endpoint_key`, None
    for the Anthropic API) and the API version it was asked under. Both are left out where they are the
    defaults, so requests hashed before either counted keep their hashes."""
    scope = endpoint or ""
    if api_version != DEFAULT_API_VERSION:
        scope += f"|anthropic-version={api_version}"
    return scope


def shared_params_hash(shared_json: str, endpoint: Optional[str], api_version: str) -> str:
    """The `shared_hash` of `params_hash` for a job: its shared params (canonical JSON) within its scope,
    so that an answer is reused only for the same request to the same service under the same version."""
    return params_hash(shared_json + answer_scope(endpoint, api_version))


def splice_prefix(shared: dict) -> str:
    """JSON text that, followed by a row part without its opening brace, is the full params object."""
    return canonical_json(shared)[:-1] + ","


def full_body(prefix: "str | None", row_body: str) -> str:
    """The full params JSON of a stored request (row part + the job's shared part)."""
    if prefix is None:
        return row_body
    return prefix + row_body[1:]


def output_schema_for(spec: JobSpec) -> Optional[dict]:
    """The JSON Schema that replies must fit: the job's own, or one built from its labels."""
    if spec.output_schema is not None:
        return spec.output_schema
    if spec.labels is None:
        return None
    enum = {"type": "string", "enum": list(spec.labels)}
    if spec.multi_label:
        prop = {"type": "array", "items": enum, "uniqueItems": True}
    else:
        prop = enum
    return {"type": "object", "properties": {"label": prop}, "required": ["label"],
            "additionalProperties": False}


# How the schema is sent as output_config.format: as the official SDK's `transform_schema` sends it
# (anthropic.lib._parse._transform; tests compare the two). Every object gets additionalProperties:
# false; keywords structured output does not take (minimum, maxLength, pattern, an unsupported string
# format, minItems above 1, ...) move into the description as a note like "{minimum: 1, maximum: 5}",
# which the model follows; oneOf becomes anyOf. Replies are still validated locally against the full
# schema. Beyond the SDK: a type list (["string", "null"]) becomes an anyOf of single types (the SDK
# cannot send one), and a subschema without a type gets "object" / "array" when its keywords say so.
SUPPORTED_STRING_FORMATS = {"date-time", "time", "date", "duration", "email", "hostname", "uri", "ipv4",
                            "ipv6", "uuid"}
_TYPE_KEYWORDS = {
    "object": ("properties", "required", "additionalProperties", "patternProperties", "propertyNames",
               "minProperties", "maxProperties", "dependentRequired", "dependentSchemas",
               "unevaluatedProperties"),
    "array": ("items", "prefixItems", "contains", "minContains", "maxContains", "minItems", "maxItems",
              "uniqueItems", "unevaluatedItems"),
    "string": ("format", "pattern", "minLength", "maxLength", "contentEncoding", "contentMediaType"),
    "integer": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
}


def api_schema(schema: dict, where: str = "output_schema") -> dict:
    """The schema as structured output takes it (see above); InputError names a subschema it cannot send."""
    if not isinstance(schema, dict):
        raise InputError(f"{where}: expected a JSON Schema object, got {schema!r}"[:200])
    schema = dict(schema)
    out: dict = {}
    for key in ("$defs", "definitions"):   # (the SDK knows only $defs: it would send "definitions" as a note)
        defs = schema.pop(key, None)
        if isinstance(defs, dict):
            out[key] = {name: api_schema(sub, f"{where}/{key}/{name}") for name, sub in defs.items()}
    ref = schema.pop("$ref", None)
    if ref is not None:
        out["$ref"] = ref
        return out
    kind = schema.pop("type", None)
    if isinstance(kind, list):
        kinds = list(dict.fromkeys(kind))
        if len(kinds) == 1:
            kind = kinds[0]
        else:
            return _type_list(schema, kinds, out, where)
    any_of, one_of, all_of = schema.pop("anyOf", None), schema.pop("oneOf", None), schema.pop("allOf", None)
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(_primitive(v) for v in enum):
        out["enum"] = list(schema.pop("enum"))
    if "const" in schema and _primitive(schema["const"]):
        out["const"] = schema.pop("const")
    literal = "enum" in out or "const" in out
    if literal:
        kind = None
    if kind is None and not literal and not (any_of or one_of or all_of):
        kind = "object" if "properties" in schema else "array" if "items" in schema else None
        if kind is None:
            raise InputError(f"{where}: needs a 'type' (or enum, const, anyOf) to be sent as structured output")
    if isinstance(any_of, list):
        out["anyOf"] = [api_schema(s, f"{where}/anyOf/{i}") for i, s in enumerate(any_of)]
    elif isinstance(one_of, list):
        out["anyOf"] = [api_schema(s, f"{where}/oneOf/{i}") for i, s in enumerate(one_of)]
    elif isinstance(all_of, list):
        out["allOf"] = [api_schema(s, f"{where}/allOf/{i}") for i, s in enumerate(all_of)]
    elif not literal:
        out["type"] = kind
    for key in ("description", "title"):
        value = schema.pop(key, None)
        if value is not None:
            out[key] = value
    if kind == "object":
        out["properties"] = {name: api_schema(sub, f"{where}/properties/{name}")
                             for name, sub in (schema.pop("properties", None) or {}).items()}
        schema.pop("additionalProperties", None)
        out["additionalProperties"] = False
        required = schema.pop("required", None)
        if required is not None:
            out["required"] = list(required)
    elif kind == "string":
        fmt = schema.pop("format", None)
        if fmt in SUPPORTED_STRING_FORMATS:
            out["format"] = fmt
        elif fmt:
            schema["format"] = fmt
    elif kind == "array":
        items = schema.pop("items", None)
        if items is not None:
            out["items"] = api_schema(items, f"{where}/items")
        min_items = schema.pop("minItems", None)
        if min_items in (0, 1) and not isinstance(min_items, bool):
            out["minItems"] = min_items
        elif min_items is not None:
            schema["minItems"] = min_items
    if schema:   # what is left is not supported: a note the model reads, as the SDK writes it
        note = "{" + ", ".join(f"{key}: {value}" for key, value in schema.items()) + "}"
        out["description"] = f"{out['description']}\n\n{note}" if out.get("description") is not None else note
    return out


def _type_list(schema: dict, kinds: list, out: dict, where: str) -> dict:
    """{"type": [a, b], ...} as {"anyOf": [{"type": a, ...}, {"type": b, ...}]}, each branch with the
    keywords of its own type; description and title stay outside."""
    for key in ("description", "title"):
        if schema.get(key) is not None:
            out[key] = schema.pop(key)
    if "enum" in schema or "const" in schema:   # literals fix the values whatever the types say
        return {**out, **api_schema(schema, where)}
    branches = []
    for i, kind in enumerate(kinds):
        own = _TYPE_KEYWORDS.get(kind, ())
        branches.append(api_schema({"type": kind, **{k: v for k, v in schema.items() if k in own}},
                                   f"{where}/type/{i}"))
    out["anyOf"] = branches
    rest = {k: v for k, v in schema.items() if not any(k in keys for keys in _TYPE_KEYWORDS.values())}
    if rest:
        note = "{" + ", ".join(f"{key}: {value}" for key, value in rest.items()) + "}"
        out["description"] = f"{out['description']}\n\n{note}" if out.get("description") is not None else note
    return out


def _primitive(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def cache_control(spec) -> dict:
    """The cache breakpoint of a job with cache_system (after its system prompt and its few-shot turns)."""
    return {"type": "ephemeral", **({"ttl": "1h"} if spec.cache_ttl == "1h" else {})}


class RequestBuilder:
    """Renders rows into Messages create params for one job."""

    def __init__(self, spec: JobSpec, model: Optional[ModelInfo], columns: Iterable[str],
                 input_name: str = "input"):
        self.spec = spec
        self.model = model
        self.columns = list(columns)
        self.template = PromptTemplate(spec.prompt)
        self._parts = self.template.parts   # plain "{{ column }}" templates render without Jinja's overhead
        names = self.template.names
        missing = sorted(names - set(self.columns) - {"row"})
        if missing:
            have = ", ".join(self.columns[:12]) + (" …" if len(self.columns) > 12 else "")
            raise InputError(f"prompt: the template uses column {missing[0]!r}, which {input_name} does not have "
                             f"(columns: {have})")
        for key in ("image_column", "max_tokens_column", "id_column"):
            col = getattr(spec, key)
            if col is not None and col not in self.columns:
                raise InputError(f"{key}: column {col!r} is not in {input_name} "
                                 f"(columns: {', '.join(self.columns[:12])})")
        # the columns the renderer needs (all of them when the template reads `row`)
        needed = set(self.columns) if "row" in names else set(names)
        for col in (spec.image_column, spec.max_tokens_column):
            if col:
                needed.add(col)
        self.needed_columns = [c for c in self.columns if c in needed]
        self.schema = output_schema_for(spec)
        self.base = self._base_params()
        # relative image paths are the input file's neighbours (as a job file's paths are the job file's)
        self.image_base = spec.image_dir or image_base(spec.input)
        # a plain template whose row part holds nothing of the row but its prompt: a block's bodies at once
        # (not when the template names what the one-row path is not given as a column — a name Jinja knows,
        # `range`, `dict`…, rendered there as "": both paths must make the same bodies, as before #17)
        self._plain = (PlainBodies.of(self._parts, canonical_json(self._part(MARK, {}, "")))
                       if self._parts is not None and not (spec.image_column or spec.max_tokens_column
                                                           or self.template.varies)
                       and all(is_text or part in self.needed_columns for is_text, part in self._parts) else None)

    # ---- the parts every request shares ------------------------------------------------------
    def _base_params(self) -> dict:
        spec = self.spec
        params: dict = {"model": spec.model, "max_tokens": spec.max_tokens}
        if spec.system:
            if spec.cache_system:
                params["system"] = [{"type": "text", "text": spec.system, "cache_control": cache_control(spec)}]
            else:
                params["system"] = spec.system
        for key in ("temperature", "top_p", "top_k", "stop_sequences", "metadata", "thinking"):
            value = getattr(spec, key)
            if value is not None:
                params[key] = value
        output_config: dict = {}
        if spec.effort:
            output_config["effort"] = spec.effort
        if self.schema is not None:
            key = "labels" if spec.labels is not None else "output_schema"
            if self.model is None or self.model.structured_output:
                output_config["format"] = {"type": "json_schema", "schema": api_schema(self.schema, key)}
            elif not self.model.forced_tool:
                raise InputError(f"{key}: {spec.model} supports neither structured output nor "
                                 "forced tool use, so it cannot return a schema")
            elif thinking_on(spec.thinking):
                raise InputError(f"{key}: {spec.model} has no structured output, and the forced tool that asks "
                                 "for a schema instead cannot be used while it thinks; turn thinking off, or use "
                                 "a model with structured output")
            else:
                params["tools"] = [{"name": OUTPUT_TOOL, "description": "Record the answer for this row.",
                                    "input_schema": self.schema}]
                params["tool_choice"] = {"type": "tool", "name": OUTPUT_TOOL}
        if output_config:
            params["output_config"] = output_config
        return params

    # ---- one row -----------------------------------------------------------------------------
    def rows(self, batch: pa.RecordBatch, text: pa.RecordBatch) -> list[dict]:
        """The cells the template reads, one dict per row, from a batch and its text (see
        InputSource.batches_with_text): every cell renders as the file wrote it. A plain
        `{{ column }}` template gets the text; Jinja gets typed cells that render as their text."""
        columns = self.needed_columns
        if not columns:
            return [{} for _ in range(batch.num_rows)]
        rows = text.select(columns).to_pylist()
        for name in columns:
            if (self._parts is None or name == self.spec.max_tokens_column) and \
                    batch.schema.field(name).type != text.schema.field(name).type:
                for row, value in zip(rows, batch.column(name).to_pylist()):
                    row[name] = as_written(value, row[name])
        return rows

    def keeps_body(self, row: dict) -> bool:
        """True when the row's body is kept by the plan rather than rendered again when it is sent
        (bodies.py): its render reads more than the job's input and identity — an image file (edited,
        moved or deleted later, the job the same), the clock or the machine's time zone — or draws at
        random (PromptTemplate.varies)."""
        if self.template.varies:
            return True
        cell = row.get(self.spec.image_column) if self.spec.image_column else None
        return isinstance(cell, str) and cell != "" and not cell.startswith(("http://", "https://"))

    def plain_bodies(self, text: pa.RecordBatch) -> Optional[list[str]]:
        """canonical_json(row_part(row)) of every row of a block (its text: InputSource.batches_with_text),
        made at once when the template is plain (plain.py); None when it is not, or when a row of the block
        is one row_part refuses: its rows are then rendered one by one."""
        return self._plain.bodies(text) if self._plain is not None else None

    def row_part(self, row: dict, where: str) -> dict:
        """The params that differ per row (messages, per-row max_tokens); `where` names the row in errors."""
        spec = self.spec
        if self._parts is not None:
            text = render_parts(self._parts, row)
        else:
            text = self.template.render(row, where)
        if len(text) > MAX_PROMPT:   # ("%*s"|format(10**9, x) and the like: the widths no one checked; plain.py too)
            raise InputError(f"prompt: {where} renders {len(text):,} characters, more than the API takes in one "
                             "request (256 MB)")
        content: Any = text
        image = (image_block(row.get(spec.image_column), where, spec.image_column, self.image_base)
                 if spec.image_column else None)
        if image is not None:
            content = [image, {"type": "text", "text": text}] if text.strip() else [image]
        elif not text.strip():   # the API refuses an empty message, a whole batch later (plain.py: the same)
            shown = spec.prompt if len(spec.prompt) <= 80 else spec.prompt[:77] + "..."
            raise InputError(f"prompt: {where} renders an empty message from the template {shown!r} "
                             "(fill the row's cells, or leave the row out)")
        return self._part(content, row, where)

    def _part(self, content: Any, row: dict, where: str) -> dict:
        """The row part around the user turn's content: few-shot turns, prefill, per-row max_tokens."""
        spec = self.spec
        messages = []
        for example in spec.few_shot or ():
            messages.append({"role": "user", "content": example["user"]})
            messages.append({"role": "assistant", "content": example["assistant"]})
        if spec.cache_system and spec.few_shot:   # the shared prefix runs through the last few-shot turn
            messages[-1] = {"role": "assistant", "content": [
                {"type": "text", "text": spec.few_shot[-1]["assistant"], "cache_control": cache_control(spec)}]}
        messages.append({"role": "user", "content": content})
        if spec.prefill:
            messages.append({"role": "assistant", "content": spec.prefill})
        part: dict = {"messages": messages}
        if spec.max_tokens_column:
            value = row.get(spec.max_tokens_column)
            part["max_tokens"] = spec.max_tokens
            if value is not None and value != "" and not isinstance(value, NullCell):   # null: the job's
                number = _whole_number(value)
                if number is None or number < 1:
                    raise InputError(f"{spec.max_tokens_column}: {where} has max_tokens {value!r}, "
                                     "expected a whole number ≥ 1")
                part["max_tokens"] = number
        return part

    def build(self, row: dict, where: str) -> dict:
        """The full params of one row (the shared part merged with the row's own part)."""
        return {**self.base, **self.row_part(row, where)}

    @property
    def shared(self) -> dict:
        """The params every request of the job shares, without the keys each row sets itself."""
        base = dict(self.base)
        if self.spec.max_tokens_column:
            base.pop("max_tokens", None)
        return base


class RowCheck:
    """The model's checks (models.check_params) on every row's params, before anything is sent.

    The shared params are checked once, with the first row; after that only what a row sets itself
    is looked at (today its max_tokens, from max_tokens_column), and each value only once — so a
    plan of 100k rows costs a dict lookup per row, and a bad row is named before any batch is made.
    """

    def __init__(self, builder: RequestBuilder, model: Optional[ModelInfo], api_version: str):
        self.builder, self.model, self.api_version = builder, model, api_version
        self.column = builder.spec.max_tokens_column
        self.seen: set = set()

    def __call__(self, part: dict, where: str) -> None:
        base = self.builder.base   # (a model the catalog lacks is held to the API version's rules)
        if not self.seen:   # the shared params, with the job's own max_tokens
            self._raise({**base, **part, "max_tokens": base["max_tokens"]}, None)
            self.seen.add(base["max_tokens"])
        value = part.get("max_tokens", base["max_tokens"])
        if value not in self.seen:
            self._raise({**base, **part}, where)
            self.seen.add(value)

    def _raise(self, params: dict, where: Optional[str]) -> None:
        problems = check_params(self.model, params, self.api_version)
        if problems:
            raise InputError(problems[0] if where is None else f"{self.column}: {where}: {problems[0]}")


def _whole_number(value: Any) -> Optional[int]:
    """A cell as a whole number (512, 512.0, "512", " 512 "), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\+?\d+", text):
            return int(text)
        try:
            value = float(text)
        except ValueError:
            return None
    try:
        if value == int(value):
            return int(value)
    except (TypeError, ValueError, OverflowError):
        pass
    return None


def image_base(input_uri: str) -> Optional[str]:
    """The folder relative image paths are read from: the input file's (None when the input is a URI:
    such paths are then read as they are)."""
    if "://" in input_uri:
        return None
    return os.path.dirname(os.path.abspath(input_uri))


def image_path(value: str, base: Optional[str]) -> str:
    """Where an image cell's file is: a relative path is relative to `base` (a URL or empty cell is kept)."""
    if not value or value.startswith(("http://", "https://")):
        return value
    path = os.path.expanduser(value)
    return path if base is None or os.path.isabs(path) else os.path.join(base, path)


def image_block(value: Any, where: str, column: str, base: Optional[str] = None) -> Optional[dict]:
    """An image content block from a URL, a file path (relative to `base`) or raw bytes; None for an
    empty cell."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": value}}
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        path = image_path(value, base)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise InputError(f"{column}: {where}: cannot read image {value!r} ({path}): "
                             f"{exc.strerror or exc}") from None
    else:
        raise InputError(f"{column}: {where}: expected an image path, URL or bytes, got {type(value).__name__}")
    media = sniff_image(data)   # the content decides, never the file name: a text file named x.png is refused
    if media is None:
        what = f"{value!r} is" if isinstance(value, str) else f"the {len(data)} bytes are"
        raise InputError(f"{column}: {where}: {what} not a PNG, JPEG, GIF or WebP image")
    return {"type": "image", "source": {"type": "base64", "media_type": media,
                                        "data": base64.b64encode(data).decode("ascii")}}


def sniff_image(data: bytes) -> Optional[str]:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


Warn = Callable[[str], None]
