"""Deterministic replies: what the emulated model answers, as a pure function of the request params.

Rules (the tests of batchrun rely on them, so they are part of the emulator's contract):

- Tokens: ``tokens(text)`` counts words, not characters: each run of ASCII letters counts one token
  per 4 letters or part of 4 (``ceil(run / 4)``), each run of digits one per 3 digits or part of 3,
  every other character that is not whitespace (punctuation, symbols, any non-ASCII character) one,
  and whitespace nothing. So ``"x" * 400`` is 100 tokens, ``"a b c d"`` 4, ``"café"`` 2: the count
  is deterministic but not proportional to the characters (an estimate extrapolated by characters
  is really tested). With the emulator's ``lean`` setting (its timing mode) a text counts
  ``ceil(characters / 4)`` instead: cheaper to compute, and the same for every client. Models whose catalog entry has ``new_tokenizer`` count ``ceil(n * 1.3)`` of
  that (applied to a whole sum).
- ``input_tokens`` (and the count_tokens endpoint) = scale(system text + the text of every message
  block + canonical JSON of ``tools`` + canonical JSON of the output schema); an image counts
  ``IMAGE_TOKENS``; a ``tool_use`` block counts its input's canonical JSON. Cached prefix tokens are
  then moved out of ``input_tokens`` into the cache fields.
- Output tokens = the sum over the content blocks of scale(tokens(block text)) (a ``tool_use`` block
  counts its input's canonical JSON).
- Free text: ``"Reply to: " + last_user_text[:120] + " #" + sha256(canonical(messages))[:8]``;
  a final assistant message (prefill) is continued: when the full reply starts with the prefill,
  only the rest is returned.
- ``output_config.format`` json_schema: the text is one compact JSON document valid against the
  schema, generated from the messages' hash. A forced tool (``tool_choice`` ``tool``/``any``):
  a ``tool_use`` block whose input is generated from its ``input_schema``; stop_reason ``tool_use``.
- Thinking (``thinking.type`` enabled/adaptive, or no ``thinking`` on a model whose default is
  adaptive): a ``thinking`` block first, counted in the output tokens.
- ``stop_sequences`` cut the text at the earliest match (stop_reason ``stop_sequence``); output over
  ``max_tokens`` is cut (stop_reason ``max_tokens``).

``canonical(x)`` is ``json.dumps(x, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``.
"""
from __future__ import annotations

import base64
import contextvars
import functools
import hashlib
import json
import random
import re
import uuid
import zlib
from typing import Any, Mapping, Optional

IMAGE_TOKENS = 1000          # what one image (or a non-text document) counts as input
DEFAULT_CACHE_MIN = 1024     # cache minimum of a model whose minimum is unknown
CACHE_TTLS = {"5m": 300.0, "1h": 3600.0}
REPLY_PREFIX = "Reply to: "
WORDS = ("alpha", "bravo", "cedar", "delta", "ember", "fable", "garnet", "harbor", "indigo", "juniper",
         "kelp", "lumen", "maple", "nectar", "onyx", "pepper", "quartz", "raven", "sable", "tundra",
         "umber", "velvet", "willow", "xenon", "yarrow", "zephyr")


# ------------------------------------------------------------------------------------ basics

def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# one match per token: a piece of up to 4 ASCII letters, up to 3 digits, or one other visible character
_TOKEN = re.compile(r"[A-Za-z]{1,4}|[0-9]{1,3}|[^A-Za-z0-9\s]")


# set per request by the emulator from its `lean` config (so two emulators in one process may differ)
CHAR_TOKENS: contextvars.ContextVar = contextvars.ContextVar("batchrun_emulator_char_tokens", default=False)


def tokens(text: str) -> int:
    """Tokens of a text (see the rules above): 0 for "" or whitespace, at least 1 for any other text."""
    if CHAR_TOKENS.get():
        return (len(text) + 3) // 4
    return len(_TOKEN.findall(text))


def scale(n: int, new_tokenizer: bool) -> int:
    """The token count of a model: x1.3 rounded up for the new tokenizer (integer arithmetic)."""
    return (n * 13 + 9) // 10 if new_tokenizer else n


def _fit(text: str, budget: int, new_tokenizer: bool) -> str:
    """The longest start of `text` whose scaled token count stays within `budget`."""
    raw = max(0, (budget * 10) // 13 if new_tokenizer else budget)
    if CHAR_TOKENS.get():
        return text[:raw * 4]
    for i, match in enumerate(_TOKEN.finditer(text)):
        if i == raw:
            return text[:match.start()]
    return text


# ------------------------------------------------------------------------------------ the catalog

@functools.lru_cache(maxsize=1)
def _catalog():
    """The shipped model catalog (what the emulated API knows), or None when it cannot be loaded.

    The user's own catalog file (BATCHRUN_MODELS) is deliberately not read: the API's knowledge of
    models does not depend on the client's configuration.
    """
    try:
        from batchrun import models
        path = getattr(models, "shipped_catalog_path", None)
        return models.load_catalog(path()) if path else models.load_catalog()
    except Exception:  # pragma: no cover - the catalog is missing or broken: accept everything
        return None


def model_info(name: Any, dated: bool = False):
    """The catalog's ModelInfo for `name` (id or alias), or None when unknown. With `dated`, a dated id
    of a family the catalog knows gives that family's (a model the emulator is told exists)."""
    catalog = _catalog()
    if catalog is None or not isinstance(name, str):
        return None
    try:
        return catalog.resolve(name, dated=dated)
    except Exception:  # pragma: no cover
        return None


def catalog_available() -> bool:
    return _catalog() is not None


def _new_tokenizer(info) -> bool:
    return bool(getattr(info, "new_tokenizer", False)) if info is not None else False


def cache_min_tokens(info) -> int:
    value = getattr(info, "cache_min_tokens", None) if info is not None else None
    return int(value) if value else DEFAULT_CACHE_MIN


# ------------------------------------------------------------------------------------ counting

def _block_raw_tokens(block: Any) -> int:
    if isinstance(block, str):
        return tokens(block)
    if not isinstance(block, dict):
        return 0
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        return tokens(text) if isinstance(text, str) else 0
    if kind == "image":
        return IMAGE_TOKENS
    if kind == "document":
        source = block.get("source")
        if isinstance(source, dict) and source.get("type") == "text" and isinstance(source.get("data"), str):
            return tokens(source["data"])
        if isinstance(source, dict) and source.get("type") == "content":
            return _content_raw_tokens(source.get("content"))
        return IMAGE_TOKENS
    if kind == "tool_use":
        return tokens(canonical(block.get("input", {})))
    if kind == "tool_result":
        return _content_raw_tokens(block.get("content"))
    if kind == "thinking":
        text = block.get("thinking")
        return tokens(text) if isinstance(text, str) else 0
    if kind == "redacted_thinking":
        data = block.get("data")
        return tokens(data) if isinstance(data, str) else 0
    return tokens(canonical({k: v for k, v in block.items() if k != "cache_control"}))


def _content_raw_tokens(content: Any) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return tokens(content)
    if isinstance(content, list):
        return sum(_block_raw_tokens(b) for b in content)
    return 0


def _system_blocks(params: Mapping) -> list:
    system = params.get("system")
    if system is None:
        return []
    if isinstance(system, str):
        return [{"type": "text", "text": system}] if system else []
    if isinstance(system, list):
        return system
    return []


def _output_schema(params: Mapping) -> Optional[Mapping]:
    config = params.get("output_config")
    if isinstance(config, dict):
        fmt = config.get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
            return fmt["schema"]
    return None


def _raw_input_tokens(params: Mapping) -> int:
    total = sum(_block_raw_tokens(b) for b in _system_blocks(params))
    messages = params.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                total += _content_raw_tokens(message.get("content"))
    tools = params.get("tools")
    if tools:
        total += tokens(canonical(tools))
    schema = _output_schema(params)
    if schema is not None:
        total += tokens(canonical(schema))
    return total


def count_tokens(params: Mapping) -> int:
    """Input tokens of a request (cached or not): what /v1/messages/count_tokens answers."""
    return scale(_raw_input_tokens(params), _new_tokenizer(model_info(params.get("model"))))


# ------------------------------------------------------------------------------------ caching

def cache_plan(params: Mapping, info: Any = "lookup") -> Optional[tuple]:
    """The cacheable prefix of a request: ``(key, prefix_tokens, ttl)`` or None.

    The prefix runs through the last block carrying ``cache_control`` (system blocks first, then
    the messages' content blocks); a top-level ``cache_control`` puts the breakpoint on the last
    block. Prefixes shorter than the model's minimum (1024 when unknown) are not cached: None.
    ``key`` covers the model and the prefix's content; ``ttl`` is "5m" or "1h".
    """
    if info == "lookup":
        info = model_info(params.get("model"))
    blocks: list = []
    marked = -1
    ttl = "5m"
    for block in _system_blocks(params):
        blocks.append(("system", block))
        if isinstance(block, dict) and isinstance(block.get("cache_control"), dict):
            marked, ttl = len(blocks) - 1, block["cache_control"].get("ttl") or "5m"
    messages = params.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            role = message.get("role")
            items = [content] if isinstance(content, str) else (content if isinstance(content, list) else [])
            for block in items:
                blocks.append((role, block))
                if isinstance(block, dict) and isinstance(block.get("cache_control"), dict):
                    marked, ttl = len(blocks) - 1, block["cache_control"].get("ttl") or "5m"
    top = params.get("cache_control")
    if isinstance(top, dict) and blocks:
        marked, ttl = len(blocks) - 1, top.get("ttl") or "5m"
    if marked < 0:
        return None
    prefix = blocks[:marked + 1]
    n = scale(sum(_block_raw_tokens(b) for _, b in prefix), _new_tokenizer(info))
    if n < cache_min_tokens(info):
        return None
    stripped = [(role, {k: v for k, v in b.items() if k != "cache_control"} if isinstance(b, dict) else b)
                for role, b in prefix]
    key = sha256_hex(canonical([params.get("model"), stripped]))
    return key, n, ttl if ttl in CACHE_TTLS else "5m"


# ------------------------------------------------------------------------------------ schema values

# Constraints structured output does not accept in a schema: the SDKs move them into the description
# as a note, e.g. "A number\n\n{minimum: 1, maximum: 10}", and the model follows the note.
NOTE_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength",
                 "maxLength", "minItems", "maxItems", "uniqueItems", "minProperties", "maxProperties", "format")
_NOTE_RE = re.compile(r"\{([^{}]*)\}\s*$")
_NOTE_ITEM_RE = re.compile(r"(\w+)\s*:\s*([^,]+)")


def description_hints(description: Any) -> dict:
    """Constraints written as a note at the end of a description: ``{minimum: 1, maxItems: 5}``."""
    if not isinstance(description, str):
        return {}
    match = _NOTE_RE.search(description)
    if not match:
        return {}
    hints = {}
    for key, raw in _NOTE_ITEM_RE.findall(match.group(1)):
        if key not in NOTE_KEYWORDS:
            continue
        raw = raw.strip()
        try:
            value = json.loads(raw)
        except ValueError:
            value = {"True": True, "False": False, "None": None}.get(raw, raw.strip("'\""))
        hints[key] = value
    return hints


class SchemaValues:
    """Deterministic values that satisfy a JSON Schema (the subset structured outputs use), following
    the constraints of description notes as a model would."""

    def __init__(self, root: Mapping, rnd: random.Random):
        self.root, self.rnd = root, rnd

    def value(self, schema: Any, depth: int = 0) -> Any:
        rnd = self.rnd
        if schema is True or not isinstance(schema, dict) or not schema:
            return rnd.choice(WORDS)
        if "$ref" in schema:
            return self.value(self._resolve(schema["$ref"]), depth + 1)
        hints = description_hints(schema.get("description"))
        if hints:
            schema = {**hints, **schema, "description": None}
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return rnd.choice(schema["enum"])
        if isinstance(schema.get("allOf"), list) and schema["allOf"]:
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                if isinstance(part, dict):
                    part = self._resolve(part["$ref"]) if "$ref" in part else part
                    for k, v in part.items():
                        if k == "properties":
                            merged["properties"] = {**merged.get("properties", {}), **v}
                        elif k == "required":
                            merged["required"] = list(dict.fromkeys([*merged.get("required", []), *v]))
                        else:
                            merged.setdefault(k, v)
            return self.value(merged, depth)
        if isinstance(schema.get("anyOf"), list) and schema["anyOf"]:
            options = [s for s in schema["anyOf"] if not (isinstance(s, dict) and s.get("type") == "null")]
            return self.value(rnd.choice(options or schema["anyOf"]), depth + 1)
        if isinstance(schema.get("oneOf"), list) and schema["oneOf"]:
            return self.value(schema["oneOf"][0], depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"]
            kind = kinds[0] if kinds else "null"
        if kind is None:
            if "properties" in schema or "required" in schema:
                kind = "object"
            elif "items" in schema or "prefixItems" in schema:
                kind = "array"
            else:
                kind = "string"
        return getattr(self, "_" + kind, self._string)(schema, depth)

    def _resolve(self, ref: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            return {}
        node: Any = self.root
        for part in ref[1:].split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            else:
                return {}
        return node

    def _null(self, schema, depth):
        return None

    def _boolean(self, schema, depth):
        return self.rnd.random() < 0.5

    def _bounds(self, schema, integer: bool):
        lo, hi = schema.get("minimum"), schema.get("maximum")
        xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        step = 1 if integer else 0.01
        if isinstance(xlo, (int, float)) and not isinstance(xlo, bool):
            lo = xlo + step if lo is None else max(lo, xlo + step)
        if isinstance(xhi, (int, float)) and not isinstance(xhi, bool):
            hi = xhi - step if hi is None else min(hi, xhi - step)
        if lo is None and hi is None:
            lo, hi = 0, 100
        elif lo is None:
            lo = hi - 100
        elif hi is None:
            hi = lo + 100
        if hi < lo:
            hi = lo
        return lo, hi

    def _integer(self, schema, depth):
        import math
        lo, hi = self._bounds(schema, True)
        lo, hi = math.ceil(lo), math.floor(hi)
        if hi < lo:
            hi = lo
        value = self.rnd.randint(lo, hi)
        multiple = schema.get("multipleOf")
        if isinstance(multiple, int) and multiple > 0 and value % multiple:
            up = value + multiple - value % multiple
            down = value - value % multiple
            value = up if up <= hi else down
        return value

    def _number(self, schema, depth):
        lo, hi = self._bounds(schema, False)
        value = round(self.rnd.uniform(lo, hi), 2)
        if value < lo or value > hi:
            value = lo
        return value

    def _string(self, schema, depth):
        rnd = self.rnd
        fmt = schema.get("format")
        if fmt == "date":
            text = f"2026-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}"
        elif fmt == "date-time":
            text = f"2026-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}T{rnd.randint(0, 23):02d}:{rnd.randint(0, 59):02d}:00Z"
        elif fmt == "time":
            text = f"{rnd.randint(0, 23):02d}:{rnd.randint(0, 59):02d}:00"
        elif fmt == "email":
            text = f"{rnd.choice(WORDS)}@example.com"
        elif fmt == "uuid":
            text = str(uuid.UUID(int=rnd.getrandbits(128), version=4))
        elif fmt in ("uri", "url"):
            text = f"https://example.com/{rnd.choice(WORDS)}"
        else:
            text = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 3)))
        max_len, min_len = schema.get("maxLength"), schema.get("minLength")
        if isinstance(max_len, int) and len(text) > max_len:
            text = text[:max_len].rstrip() if max_len > 0 else ""
            if isinstance(min_len, int) and len(text) < min_len:
                text = text.ljust(min_len, "x")
        if isinstance(min_len, int) and len(text) < min_len:
            text = text + "x" * (min_len - len(text))
        return text

    def _array(self, schema, depth):
        rnd = self.rnd
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list):
            return [self.value(s, depth + 1) for s in prefix]
        items = schema.get("items", {})
        min_items = schema.get("minItems") if isinstance(schema.get("minItems"), int) else 0
        max_items = schema.get("maxItems") if isinstance(schema.get("maxItems"), int) else None
        lo = max(min_items, 1)
        if max_items is not None:
            lo = min(lo, max_items)
        hi = max(lo, min(3, max_items) if max_items is not None else 3)
        n = min_items if depth > 5 else rnd.randint(lo, hi)
        if schema.get("uniqueItems"):
            enum = items.get("enum") if isinstance(items, dict) else None
            if isinstance(enum, list) and enum:
                pool = list(enum)
                rnd.shuffle(pool)
                return pool[:min(n, len(pool))]
            out: list = []
            seen: set = set()
            for _ in range(n * 10):
                if len(out) >= n:
                    break
                value = self.value(items, depth + 1)
                key = canonical(value)
                if key not in seen:
                    seen.add(key)
                    out.append(value)
            return out
        return [self.value(items, depth + 1) for _ in range(n)]

    def _object(self, schema, depth):
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        required = [r for r in schema.get("required", []) if isinstance(r, str)]
        out = {}
        for name, sub in props.items():
            if depth > 5 and name not in required:
                continue
            out[name] = self.value(sub, depth + 1)
        for name in required:
            if name not in out:
                out[name] = self.value({}, depth + 1)
        return out


def schema_value(schema: Mapping, seed: str) -> Any:
    """A deterministic value valid against `schema` (seeded by the string `seed`)."""
    return SchemaValues(schema, random.Random(seed)).value(schema)


# ------------------------------------------------------------------------------------ replies

def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b["text"] for b in content
                         if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str))
    return ""


def last_user_text(messages: Any) -> str:
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return _text_of(message.get("content"))
    return ""


def prefill_text(messages: Any) -> Optional[str]:
    """The text of a final assistant message (a prefill), or None."""
    if isinstance(messages, list) and messages:
        last = messages[-1]
        if isinstance(last, dict) and last.get("role") == "assistant":
            return _text_of(last.get("content"))
    return None


def thinking_on(params: Mapping, info: Any) -> bool:
    thinking = params.get("thinking")
    if isinstance(thinking, dict):
        return thinking.get("type") in ("enabled", "adaptive")
    return getattr(info, "thinking_default", "off") == "adaptive" if info is not None else False


def forced_tool(params: Mapping) -> Optional[Mapping]:
    """The tool a `tool_choice` of type tool (by name) or any (the first tool) forces, or None."""
    choice = params.get("tool_choice")
    tools = params.get("tools")
    if not isinstance(choice, dict) or not isinstance(tools, list):
        return None
    custom = [t for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]
    if choice.get("type") == "tool":
        for tool in custom:
            if tool["name"] == choice.get("name"):
                return tool
        return None
    if choice.get("type") == "any" and custom:
        return custom[0]
    return None


def messages_hash(messages: Any) -> str:
    """64 hex digits that stand for the messages: sha256 of their canonical JSON; in the lean mode
    (CHAR_TOKENS) a CRC-32 of the messages' text, repeated (cheap; still the same for every client)."""
    if CHAR_TOKENS.get():
        texts = [_text_of(m.get("content")) if isinstance(m, dict) else "" for m in messages] \
            if isinstance(messages, list) else []
        return f"{zlib.crc32(chr(0).join(texts).encode('utf-8')):08x}" * 8
    return sha256_hex(canonical(messages))


def reply_text(params: Mapping) -> str:
    """The free-text reply before stop sequences and max_tokens apply."""
    messages = params.get("messages")
    digest = messages_hash(messages)[:8]
    full = f"{REPLY_PREFIX}{last_user_text(messages)[:120]} #{digest}"
    prefill = prefill_text(messages)
    if prefill and full.startswith(prefill):
        return full[len(prefill):]
    return full


def _off_schema(messages_hash: str, rate: float) -> bool:
    return rate > 0 and int(messages_hash[:8], 16) / 0x100000000 < rate


def breaks_schema(value: Any, schema: Mapping) -> Any:
    """`value` (an object valid against `schema`) made to break it, as a reply can: the first property
    with a constraint that structured output passes on only as a description note (maximum, maxItems,
    maxLength) goes past it; without one, the first property gets a value of the wrong type."""
    if not isinstance(value, dict) or not value:
        return ["not", "an", "object"]
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    out = dict(value)
    for name in out:
        sub = props.get(name) if isinstance(props.get(name), dict) else {}
        hints = {**description_hints(sub.get("description")), **sub}
        if isinstance(hints.get("maximum"), (int, float)) and not isinstance(hints["maximum"], bool):
            out[name] = hints["maximum"] + 1
            return out
        if isinstance(hints.get("maxItems"), int) and isinstance(out[name], list):
            out[name] = (out[name] or ["x"]) * (hints["maxItems"] + 1)
            return out
        if isinstance(hints.get("maxLength"), int) and isinstance(out[name], str):
            out[name] = "x" * (hints["maxLength"] + 1)
            return out
    name = next(iter(out))
    out[name] = 12345 if isinstance(out[name], str) else "not the schema's type"
    return out


def _signature(seed: str) -> str:
    return base64.b64encode(hashlib.sha256(("sig:" + seed).encode()).digest() * 2).decode()


def reply_for(params: Mapping, *, cache_write: int = 0, cache_read: int = 0, cache_ttl: str = "5m",
              service_tier: str = "batch", message_id: Optional[str] = None, off_schema: float = 0.0) -> dict:
    """The Message the emulated model answers to `params` (assumed valid and accepted).

    A pure function of `params`: ``cache_write`` / ``cache_read`` move that many input tokens into
    the cache fields (the emulator decides them from its cache state); ``message_id`` defaults to
    one derived from the params. ``off_schema``: the fraction of schema replies that break their
    schema (see `breaks_schema`), chosen by the messages' hash.
    """
    info = model_info(params.get("model"))
    new = _new_tokenizer(info)
    messages = params.get("messages")
    digest = messages_hash(messages)
    max_tokens = params.get("max_tokens")
    budget = max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) else 4096
    content: list = []
    output_tokens = 0
    thinking_tokens = 0
    stop_reason = "end_turn"
    stop_sequence = None

    def cut(text: str) -> tuple:
        """`text` cut to the remaining budget: (text, tokens, was_cut)."""
        n = scale(tokens(text), new)
        if n <= budget:
            return text, n, False
        text = _fit(text, budget, new)
        return text, scale(tokens(text), new), True

    if thinking_on(params, info):
        thought, n, was_cut = cut(f"Thinking about: {last_user_text(messages)[:60]} (#{digest[:8]})")
        content.append({"type": "thinking", "thinking": thought, "signature": _signature(digest)})
        output_tokens += n
        thinking_tokens = n
        budget -= n
        if was_cut:
            stop_reason = "max_tokens"

    tool = forced_tool(params)
    if stop_reason == "max_tokens":
        pass
    elif tool is not None:
        schema = tool.get("input_schema") if isinstance(tool.get("input_schema"), dict) else {"type": "object"}
        value = schema_value(schema, f"{digest}:tool:{tool['name']}")
        if _off_schema(digest, off_schema):
            value = breaks_schema(value, schema)
        n = scale(tokens(canonical(value)), new)
        tool_id = "toolu_" + _alnum(sha256_hex(f"{digest}:toolu"), 24)
        if n <= budget:
            content.append({"type": "tool_use", "id": tool_id, "name": tool["name"], "input": value})
            output_tokens += n
            stop_reason = "tool_use"
        else:  # the input did not fit: an incomplete call, as the API gives it
            content.append({"type": "tool_use", "id": tool_id, "name": tool["name"], "input": {}})
            output_tokens += budget
            stop_reason = "max_tokens"
    else:
        schema = _output_schema(params)
        if schema is not None:
            value = schema_value(schema, f"{digest}:json")
            if _off_schema(digest, off_schema):
                value = breaks_schema(value, schema)
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        else:
            text = reply_text(params)
        stops = params.get("stop_sequences")
        if isinstance(stops, list):
            hits = [(text.find(s), s) for s in stops if isinstance(s, str) and s and s in text]
            if hits:
                at, seq = min(hits)
                text, stop_reason, stop_sequence = text[:at], "stop_sequence", seq
        text, n, was_cut = cut(text)
        if was_cut:
            stop_reason, stop_sequence = "max_tokens", None
        if text or not content:
            content.append({"type": "text", "text": text})
        output_tokens += n

    total_input = count_tokens(params)
    cache_write = max(0, min(cache_write, total_input))
    cache_read = max(0, min(cache_read, total_input - cache_write))
    usage = {
        "input_tokens": total_input - cache_write - cache_read,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": cache_write,
        "cache_read_input_tokens": cache_read,
        "cache_creation": {"ephemeral_5m_input_tokens": cache_write if cache_ttl != "1h" else 0,
                           "ephemeral_1h_input_tokens": cache_write if cache_ttl == "1h" else 0},
        "service_tier": service_tier,
    }
    if thinking_tokens:
        usage["output_tokens_details"] = {"thinking_tokens": thinking_tokens}
    return {
        "id": message_id or "msg_" + _alnum(sha256_hex("msg:" + canonical(params)), 24),
        "type": "message",
        "role": "assistant",
        "model": params.get("model"),
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage,
    }


# params that do not change a reply's content (the lean path may ignore them)
_LEAN_IGNORED = frozenset(("model", "max_tokens", "messages", "temperature", "top_p", "top_k", "metadata",
                           "service_tier"))


def lean_reply(params: Mapping, message_id: str) -> Optional[str]:
    """The JSON text of reply_for(params, message_id=...) in the lean mode (CHAR_TOKENS set) for a plain
    request (text messages ending with the user's; no system prompt, tools, schema, thinking or stop
    sequences), computed with less work; None for any other request (then call reply_for)."""
    if not _LEAN_IGNORED.issuperset(params):
        return None
    messages = params.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    total = 0
    texts = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return None
        texts.append(m["content"])
        total += (len(m["content"]) + 3) // 4
    last = messages[-1]
    if last.get("role") != "user" or not CHAR_TOKENS.get():
        return None
    new, thinks, model_json = _lean_model(params.get("model"))
    if thinks:   # (a request with `thinking` is not lean: the model's default decides)
        return None
    max_tokens = params.get("max_tokens")
    budget = max_tokens if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) else 4096
    # reply_text(params) for such messages: the last is the user's (no prefill), the digest messages_hash's
    text = f"{REPLY_PREFIX}{last['content'][:120]} #{zlib.crc32(chr(0).join(texts).encode('utf-8')):08x}"
    n = scale((len(text) + 3) // 4, new)
    stop_reason = "end_turn"
    if n > budget:
        text = _fit(text, budget, new)
        n, stop_reason = scale((len(text) + 3) // 4, new), "max_tokens"
    dumps = LEAN_STRING
    return (f'{{"id":{dumps(message_id)},"type":"message","role":"assistant","model":{model_json},'
            f'"content":[{{"type":"text","text":{dumps(text)}}}],"stop_reason":"{stop_reason}","stop_sequence":null,'
            f'"usage":{{"input_tokens":{scale(total, new)},"output_tokens":{n},"cache_creation_input_tokens":0,'
            f'"cache_read_input_tokens":0,"cache_creation":{{"ephemeral_5m_input_tokens":0,'
            f'"ephemeral_1h_input_tokens":0}},"service_tier":"batch"}}}}')


_LEAN_MODELS: dict = {}   # model -> (the catalog it was read from, new tokenizer, thinks by default, its JSON)


def _lean_model(model: Any) -> tuple:
    """(new tokenizer, thinks by default, the model as a JSON value) of `model` in the current catalog, read
    once per catalog."""
    catalog = _catalog()
    got = _LEAN_MODELS.get(model) if isinstance(model, str) else None
    if got is None or got[0] is not catalog:
        info = model_info(model)
        got = (catalog, _new_tokenizer(info), thinking_on({}, info), _LEAN_VALUE(model))
        if isinstance(model, str):
            _LEAN_MODELS[model] = got
    return got[1:]


_LEAN_VALUE = json.JSONEncoder(ensure_ascii=False).encode   # one JSON value, as canonical()
LEAN_STRING = json.encoder.encode_basestring   # the same for a str, without the encoder's Python call around it


_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _alnum(hex_digest: str, n: int) -> str:
    value = int(hex_digest, 16)
    out = []
    for _ in range(n):
        value, r = divmod(value, 62)
        out.append(_ALNUM[r])
    return "".join(out)
