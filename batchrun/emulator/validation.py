"""Request validation, as the API does it.

Two levels:

- structural problems (a wrong type, a missing or unknown key): the whole call is refused with a
  400 whose message starts with the path of the field (``requests.3.params.max_tokens: ...``);
- semantic problems of one request (empty text, a prefill ending in whitespace, an unknown forced
  tool, a param the model refuses, an unknown model): on ``/v1/messages`` a 400 (404 for the model),
  inside a batch an ``errored`` result for that request only.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

CUSTOM_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
TOOL_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")

# The keys of the official SDK's MessageCreateParamsNonStreaming (anthropic 2.x), plus the sampling
# params that API version 2023-06-01 still accepts on older models.
MESSAGE_PARAM_KEYS = frozenset({
    "cache_control", "container", "diagnostics", "inference_geo", "max_tokens", "messages", "metadata",
    "model", "output_config", "service_tier", "speed", "stop_sequences", "system", "thinking",
    "tool_choice", "tools", "user_profile_id", "workspace_id", "temperature", "top_p", "top_k",
})
# The keys of the SDK's MessageCountTokensParams.
COUNT_TOKENS_KEYS = frozenset({
    "cache_control", "messages", "model", "output_config", "speed", "system", "thinking", "tool_choice",
    "tools", "user_profile_id", "workspace_id",
})
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
EFFORTS = ("low", "medium", "high", "xhigh", "max")


class Invalid(Exception):
    """A structural problem: `str(self)` is ``"<field path>: <what is wrong>"``."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------ structural

def check_batch_request(item: Any, index: int, seen: dict, validate: bool) -> tuple:
    """One entry of a batch's `requests`: returns (custom_id, params) or raises Invalid.

    `seen` maps custom_id -> index, for the uniqueness check.
    """
    where = f"requests.{index}"
    if not isinstance(item, dict):
        raise Invalid(where, "Input should be an object with custom_id and params")
    custom_id = item.get("custom_id")
    params = item.get("params")
    if validate:
        for key in item:
            if key not in ("custom_id", "params"):
                raise Invalid(_join(where, key), "Extra inputs are not permitted")
        if "custom_id" not in item:
            raise Invalid(f"{where}.custom_id", "Field required")
        if not isinstance(custom_id, str) or not CUSTOM_ID_RE.match(custom_id):
            raise Invalid(f"{where}.custom_id", f"String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$' "
                                                f"(got {custom_id!r})")
        if custom_id in seen:
            raise Invalid(f"{where}.custom_id", f"duplicate custom_id {custom_id!r} (already used by "
                                                f"requests.{seen[custom_id]}.custom_id; custom_ids must be "
                                                f"unique within a batch)")
        if "params" not in item:
            raise Invalid(f"{where}.params", "Field required")
        check_message_params(params, f"{where}.params", kind="batch")
    else:
        if not isinstance(custom_id, str):
            raise Invalid(f"{where}.custom_id", "Field required")
        if not isinstance(params, dict):
            raise Invalid(f"{where}.params", "Input should be an object")
    seen[custom_id] = index
    return custom_id, params


def check_message_params(params: Any, where: str = "", *, kind: str = "messages") -> None:
    """Structural checks of Messages params. kind: "batch" | "messages" | "count_tokens"."""
    if not isinstance(params, dict):
        raise Invalid(where, "Input should be an object")
    allowed = COUNT_TOKENS_KEYS if kind == "count_tokens" else MESSAGE_PARAM_KEYS
    for key in params:
        if key == "stream":
            if kind == "batch":
                raise Invalid(_join(where, key), "streaming is not supported inside a batch (remove 'stream')")
            if kind == "messages" and params[key] not in (False, None):
                raise Invalid(_join(where, key), "streaming is not supported by the emulator")
            if kind == "messages":
                continue
        if key not in allowed:
            raise Invalid(_join(where, key), "Extra inputs are not permitted")

    model = params.get("model")
    if "model" not in params:
        raise Invalid(_join(where, "model"), "Field required")
    if not isinstance(model, str) or not model:
        raise Invalid(_join(where, "model"), "Input should be a non-empty string")

    if kind != "count_tokens":
        if "max_tokens" not in params:
            raise Invalid(_join(where, "max_tokens"), "Field required")
        max_tokens = params["max_tokens"]
        if not _is_int(max_tokens):
            raise Invalid(_join(where, "max_tokens"), f"Input should be a valid integer (got {max_tokens!r})")
        if max_tokens < 1:
            raise Invalid(_join(where, "max_tokens"), f"Input should be greater than or equal to 1 (got {max_tokens})")

    _check_messages(params.get("messages", _MISSING), _join(where, "messages"))
    if "system" in params:
        _check_system(params["system"], _join(where, "system"))
    if "cache_control" in params and params["cache_control"] is not None:
        _check_cache_control(params["cache_control"], _join(where, "cache_control"))
    if "stop_sequences" in params:
        stops = params["stop_sequences"]
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise Invalid(_join(where, "stop_sequences"), "Input should be a list of strings")
    if "metadata" in params:
        _check_metadata(params["metadata"], _join(where, "metadata"))
    if "tools" in params:
        _check_tools(params["tools"], _join(where, "tools"))
    if "tool_choice" in params:
        _check_tool_choice(params["tool_choice"], _join(where, "tool_choice"))
    if "thinking" in params:
        _check_thinking(params["thinking"], _join(where, "thinking"))
    if "output_config" in params:
        _check_output_config(params["output_config"], _join(where, "output_config"))
    for key, lo, hi in (("temperature", 0.0, 1.0), ("top_p", 0.0, 1.0)):
        if key in params and params[key] is not None:
            value = params[key]
            if not _is_number(value) or not lo <= value <= hi:
                raise Invalid(_join(where, key), f"Input should be a number between {lo:g} and {hi:g} (got {value!r})")
    if "top_k" in params and params["top_k"] is not None:
        if not _is_int(params["top_k"]) or params["top_k"] < 0:
            raise Invalid(_join(where, "top_k"), f"Input should be a non-negative integer (got {params['top_k']!r})")
    if "service_tier" in params and params["service_tier"] not in ("auto", "standard_only"):
        raise Invalid(_join(where, "service_tier"), "Input should be 'auto' or 'standard_only'")


_MISSING = object()


def _check_messages(messages: Any, where: str) -> None:
    if messages is _MISSING:
        raise Invalid(where, "Field required")
    if not isinstance(messages, list):
        raise Invalid(where, "Input should be a valid list")
    if not messages:
        raise Invalid(where, "at least one message is required")
    for i, message in enumerate(messages):
        at = f"{where}.{i}"
        if not isinstance(message, dict):
            raise Invalid(at, "Input should be an object with role and content")
        for key in message:
            if key not in ("role", "content"):
                raise Invalid(f"{at}.{key}", "Extra inputs are not permitted")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise Invalid(f"{at}.role", f"Input should be 'user' or 'assistant' (got {role!r})")
        if "content" not in message:
            raise Invalid(f"{at}.content", "Field required")
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise Invalid(f"{at}.content", "Input should be a string or a list of content blocks")
        for j, block in enumerate(content):
            _check_block(block, f"{at}.content.{j}")


def _check_block(block: Any, where: str) -> None:
    if not isinstance(block, dict):
        raise Invalid(where, "Input should be a content block object")
    kind = block.get("type")
    if not isinstance(kind, str):
        raise Invalid(f"{where}.type", "Field required")
    if kind == "text" and not isinstance(block.get("text"), str):
        raise Invalid(f"{where}.text", "Input should be a valid string")
    if kind == "image":
        source = block.get("source")
        if not isinstance(source, dict):
            raise Invalid(f"{where}.source", "Field required")
        if source.get("type") == "base64":
            if source.get("media_type") not in IMAGE_MEDIA_TYPES:
                raise Invalid(f"{where}.source.media_type",
                              f"Input should be one of {', '.join(IMAGE_MEDIA_TYPES)} (got {source.get('media_type')!r})")
            if not isinstance(source.get("data"), str):
                raise Invalid(f"{where}.source.data", "Field required")
        elif source.get("type") == "url":
            if not isinstance(source.get("url"), str):
                raise Invalid(f"{where}.source.url", "Field required")
        elif source.get("type") != "file":
            raise Invalid(f"{where}.source.type", f"Input should be 'base64', 'url' or 'file' (got {source.get('type')!r})")
    if kind == "tool_use":
        if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
            raise Invalid(where, "tool_use blocks need id and name")
    if kind == "tool_result" and not isinstance(block.get("tool_use_id"), str):
        raise Invalid(f"{where}.tool_use_id", "Field required")
    if block.get("cache_control") is not None:
        _check_cache_control(block["cache_control"], f"{where}.cache_control")


def _check_cache_control(value: Any, where: str) -> None:
    if not isinstance(value, dict) or value.get("type") != "ephemeral":
        raise Invalid(where, "Input should be {\"type\": \"ephemeral\"} (optionally with \"ttl\": \"5m\" | \"1h\")")
    for key in value:
        if key not in ("type", "ttl"):
            raise Invalid(f"{where}.{key}", "Extra inputs are not permitted")
    if "ttl" in value and value["ttl"] not in ("5m", "1h"):
        raise Invalid(f"{where}.ttl", f"Input should be '5m' or '1h' (got {value['ttl']!r})")


def _check_system(system: Any, where: str) -> None:
    if isinstance(system, str):
        return
    if not isinstance(system, list):
        raise Invalid(where, "Input should be a string or a list of text blocks")
    for i, block in enumerate(system):
        at = f"{where}.{i}"
        if not isinstance(block, dict) or block.get("type") != "text":
            raise Invalid(f"{at}.type", "system blocks must be text blocks ({\"type\": \"text\", \"text\": ...})")
        if not isinstance(block.get("text"), str):
            raise Invalid(f"{at}.text", "Input should be a valid string")
        for key in block:
            if key not in ("type", "text", "cache_control", "citations"):
                raise Invalid(f"{at}.{key}", "Extra inputs are not permitted")
        if block.get("cache_control") is not None:
            _check_cache_control(block["cache_control"], f"{at}.cache_control")


def _check_metadata(metadata: Any, where: str) -> None:
    if not isinstance(metadata, dict):
        raise Invalid(where, "Input should be an object")
    for key, value in metadata.items():
        if key != "user_id":
            raise Invalid(f"{where}.{key}", "Extra inputs are not permitted")
        if value is not None and not isinstance(value, str):
            raise Invalid(f"{where}.user_id", "Input should be a string")


def _check_tools(tools: Any, where: str) -> None:
    if not isinstance(tools, list):
        raise Invalid(where, "Input should be a valid list")
    names = set()
    for i, tool in enumerate(tools):
        at = f"{where}.{i}"
        if not isinstance(tool, dict):
            raise Invalid(at, "Input should be an object")
        if tool.get("type") not in (None, "custom"):
            continue  # a server tool (web search, code execution, ...)
        name = tool.get("name")
        if not isinstance(name, str) or not TOOL_NAME_RE.match(name):
            raise Invalid(f"{at}.name", f"String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$' (got {name!r})")
        if name in names:
            raise Invalid(f"{at}.name", f"tool names must be unique ({name!r} is used twice)")
        names.add(name)
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise Invalid(f"{at}.input_schema", "Field required")
        if schema.get("type") != "object":
            raise Invalid(f"{at}.input_schema.type", "Input should be 'object'")


def _check_tool_choice(choice: Any, where: str) -> None:
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "none", "tool"):
        raise Invalid(f"{where}.type", "Input should be 'auto', 'any', 'none' or 'tool'")
    if choice["type"] == "tool" and not isinstance(choice.get("name"), str):
        raise Invalid(f"{where}.name", "Field required")


def _check_thinking(thinking: Any, where: str) -> None:
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "adaptive", "disabled"):
        raise Invalid(f"{where}.type", "Input should be 'enabled', 'adaptive' or 'disabled'")
    if thinking["type"] == "enabled" and not _is_int(thinking.get("budget_tokens")):
        raise Invalid(f"{where}.budget_tokens", "Field required (an integer)")


def _check_output_config(config: Any, where: str) -> None:
    if not isinstance(config, dict):
        raise Invalid(where, "Input should be an object")
    for key in config:
        if key not in ("effort", "format", "task_budget"):
            raise Invalid(f"{where}.{key}", "Extra inputs are not permitted")
    if config.get("effort") is not None and config["effort"] not in EFFORTS:
        raise Invalid(f"{where}.effort", f"Input should be one of {', '.join(EFFORTS)}")
    fmt = config.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            raise Invalid(f"{where}.format.type", "Input should be 'json_schema'")
        if not isinstance(fmt.get("schema"), dict):
            raise Invalid(f"{where}.format.schema", "Field required (a JSON Schema object)")


# ------------------------------------------------------------------------------------ semantic

# JSON Schema keywords structured output (output_config.format) refuses; the official SDKs move them
# into the description as a note (which the model then follows).
UNSUPPORTED_SCHEMA_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
                               "minLength", "maxLength", "maxItems", "uniqueItems", "minProperties",
                               "maxProperties")


def schema_problem(schema: Any, where: str, depth: int = 0) -> Optional[str]:
    """The first keyword of an output schema that structured output does not accept, or None."""
    if depth > 32:
        return None
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            problem = schema_problem(item, f"{where}.{i}", depth + 1)
            if problem:
                return problem
        return None
    if not isinstance(schema, dict):
        return None
    for key, value in schema.items():
        if key in UNSUPPORTED_SCHEMA_KEYWORDS or (key == "minItems" and _is_int(value) and value > 1):
            return (f"{where}.{key}: '{key}' is not supported in output_config.format schemas (state it in "
                    f"the description instead, as the SDKs do)")
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            for name, sub in value.items():
                problem = schema_problem(sub, f"{where}.{key}.{name}", depth + 1)
                if problem:
                    return problem
        elif key in ("items", "anyOf", "allOf", "oneOf", "additionalProperties", "prefixItems", "not"):
            problem = schema_problem(value, f"{where}.{key}", depth + 1)
            if problem:
                return problem
    return None


def semantic_problem(params: Mapping) -> Optional[str]:
    """A problem the API reports for this one request (a 400 / an errored batch result), or None."""
    messages = params.get("messages")
    if isinstance(messages, list):
        last = len(messages) - 1
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            final_assistant = i == last and message.get("role") == "assistant"
            if not final_assistant:
                if content == "" or content == []:
                    return (f"messages.{i}.content: all messages must have non-empty content except for "
                            f"the optional final assistant message")
                if isinstance(content, list):
                    for j, block in enumerate(content):
                        if isinstance(block, dict) and block.get("type") == "text" and block.get("text") == "":
                            return f"messages.{i}.content.{j}.text: text content blocks must be non-empty"
            elif isinstance(content, str) and content and content != content.rstrip():
                return f"messages.{i}.content: final assistant content cannot end with trailing whitespace"
            elif isinstance(content, list) and content:
                block = content[-1]
                if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str) \
                        and block["text"] != block["text"].rstrip():
                    return f"messages.{i}.content: final assistant content cannot end with trailing whitespace"
    config = params.get("output_config")
    if isinstance(config, dict) and isinstance(config.get("format"), dict):
        problem = schema_problem(config["format"].get("schema"), "output_config.format.schema")
        if problem:
            return problem
    choice = params.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") in ("tool", "any"):
        tools = params.get("tools") if isinstance(params.get("tools"), list) else []
        names = [t.get("name") for t in tools if isinstance(t, dict)]
        if choice["type"] == "tool" and choice.get("name") not in names:
            return f"tool_choice.name: tool {choice.get('name')!r} is not among the request's tools"
        if choice["type"] == "any" and not names:
            return "tool_choice: type 'any' needs at least one tool in tools"
        thinking = params.get("thinking")
        if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive"):
            return "thinking: thinking may not be enabled when tool_choice forces tool use"
    return None
