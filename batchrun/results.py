"""One result line (or one Messages reply) → the fields stored for its row.

Text blocks are joined into `text` (thinking blocks are kept out of it). With an output schema the
reply — a JSON text block, or the input of the forced output tool — is parsed and validated; a reply
that does not fit ends as `invalid_output` with the reason, and its raw text is kept.
"""
from __future__ import annotations

import json
from decimal import Decimal
from typing import Any, Optional

import logging

from .errors import ABOUT_REQUEST, error_class
from .models import Catalog
from .schema_types import ColumnError, best_match, schema_converters, schema_validator
from .states import ERRORED, EXPIRED, INVALID_OUTPUT, SUCCEEDED
from .requests import OUTPUT_TOOL


USAGE_COUNTS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
MAX_TOKEN_COUNT = 2 ** 53   # past this no count is a JSON integer any reader keeps exactly


def clean_usage(value: Any) -> tuple[dict, list]:
    """A reply's `usage` as batchrun reads it, and what in it could not be read. Only non-negative whole
    numbers (below MAX_TOKEN_COUNT) are token counts: a count that is a string, negative, fractional, a
    boolean or absurdly large — or a usage that is not an object — is dropped (recorded as missing, priced
    at 0 like a missing count, and flagged), never taken at face value nor allowed to lower a cost.
    A usage with nothing to drop or convert (the usual case) is returned itself, not a copy: not to be
    modified."""
    if not isinstance(value, dict):
        return {}, ([] if value is None else ["usage"])
    if _readable(value):
        return value, []
    usage, bad = dict(value), []
    for key in USAGE_COUNTS:
        if key not in usage or usage[key] is None:
            continue
        n = _token_count(usage[key])
        if n is None:
            bad.append(key)
            usage.pop(key)
        else:
            usage[key] = n
    split = usage.get("cache_creation")
    if isinstance(split, dict):
        kept, split_bad = clean_usage_split(split)
        usage["cache_creation"] = kept
        bad += [f"cache_creation.{k}" for k in split_bad]
    elif split is not None:
        usage.pop("cache_creation")
        bad.append("cache_creation")
    return usage, bad


def _readable(usage: dict) -> bool:
    """Whether every count of `usage` (and of its cache_creation split) is already a token count or None:
    then clean_usage has nothing to do (checked first, the way nearly every reply is)."""
    for key in USAGE_COUNTS:
        n = usage.get(key)
        if n is not None and not (type(n) is int and 0 <= n < MAX_TOKEN_COUNT):
            return False
    split = usage.get("cache_creation")
    if split is None:
        return True
    if type(split) is not dict:
        return False
    for n in split.values():
        if n is not None and not (type(n) is int and 0 <= n < MAX_TOKEN_COUNT):
            return False
    return True


def clean_usage_split(split: dict) -> tuple[dict, list]:
    kept, bad = {}, []
    for key, n in split.items():
        count = None if n is None else _token_count(n)
        if n is None or count is not None:
            kept[key] = count
        else:
            bad.append(key)
    return kept, bad


def _token_count(n: Any) -> Optional[int]:
    """`n` as a token count: a non-negative whole number below MAX_TOKEN_COUNT (a whole float as its int),
    or None when it cannot be one (a string, a boolean, negative, fractional, absurdly large)."""
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < MAX_TOKEN_COUNT:
        return None
    return n


log = logging.getLogger("batchrun")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 200 else text[:200] + "…"


TRANSIENT_ERRORS = {"api_error", "overloaded_error", "rate_limit_error", "timeout_error"}
# the cost of a request the API answered with an error, or never ran (expired, canceled): not billed
NOT_BILLED = 0.0


class ResultParser:
    def __init__(self, catalog: Catalog, model: str, *, schema: Optional[dict], batch: bool, cache_ttl: str):
        self.catalog = catalog
        self.model = model
        self.batch = batch
        self.cache_ttl = cache_ttl
        self.schema = schema
        self.unpriced = False
        self.unreadable_usage = 0    # replies of this run whose usage held counts that cannot be right
        self._costs: dict = {}

    @property
    def schema(self) -> Optional[dict]:
        return self._schema

    @schema.setter
    def schema(self, schema: Optional[dict]) -> None:
        """The output schema: replies are validated against it and must fit its typed columns."""
        self._schema = schema
        self.validator = schema_validator()(schema) if schema is not None else None
        self.columns = schema_converters(schema)

    def parse(self, result: dict) -> dict:
        """Fields for the requests table from `result` (the `result` object of a JSONL line)."""
        kind = result.get("type")
        if kind == "succeeded":
            return self.message(result.get("message") or {})
        # the API bills none of these: their cost is 0 (not null, which means "price unknown")
        if kind == "errored":
            outer = result.get("error") or {}
            inner = outer.get("error") if isinstance(outer.get("error"), dict) else outer
            return {"result_type": "errored", "state": ERRORED,
                    "error_type": inner.get("type") or "api_error",
                    "error_message": inner.get("message") or "", "cost_usd": NOT_BILLED,
                    "from_api": True}
        if kind in ("expired", "canceled"):   # (the API's result types: the row's state of the same name)
            return {"result_type": kind, "state": kind, "error_type": kind, "cost_usd": NOT_BILLED,
                    "error_message": "the batch expired before this request ran" if kind == "expired"
                    else "the batch was canceled before this request ran"}
        return {"result_type": "errored", "state": ERRORED, "error_type": "unknown_result",
                "error_message": f"unknown result type {kind!r}"}

    def message(self, message: dict) -> dict:
        usage, bad = clean_usage(message.get("usage"))
        if bad:
            self.unreadable_usage += 1
            if self.unreadable_usage == 1:
                log.warning("a reply's usage cannot be right (%s: %s): the counts that cannot be read are "
                            "recorded as missing (priced at $0) and flagged", ", ".join(bad),
                            _short(message.get("usage")))
        texts, tool_input = [], None
        for block in message.get("content") or []:
            btype = block.get("type")
            if btype == "text":
                texts.append(block.get("text") or "")
            elif btype == "tool_use" and block.get("name") == OUTPUT_TOOL:
                tool_input = block.get("input")
        text = "".join(texts)
        split = usage.get("cache_creation")
        split = split if isinstance(split, dict) else {}
        cost = self._cost(usage, split)
        if cost is None:
            self.unpriced = True
        # (clean_usage leaves every count a token count or None)
        fields: dict[str, Any] = {
            "result_type": "succeeded", "state": SUCCEEDED, "text": text,
            "stop_reason": message.get("stop_reason"), "model": message.get("model"),
            "input_tokens": usage.get("input_tokens"),
            "output_tokens": usage.get("output_tokens"),
            "cache_creation_input_tokens": usage.get("cache_creation_input_tokens"),
            "cache_read_input_tokens": usage.get("cache_read_input_tokens"),
            # the cache writes by lifetime, when the reply splits them (priced apart: see Catalog.cost_by_kind)
            "cache_creation_5m_input_tokens": split.get("ephemeral_5m_input_tokens"),
            "cache_creation_1h_input_tokens": split.get("ephemeral_1h_input_tokens"),
            "cost_usd": cost, "error_type": None, "error_message": None, "parsed": None,
        }
        if self.validator is not None:
            self._structured(fields, text, tool_input)
        return fields

    def _cost(self, usage: dict, split: dict) -> Optional[float]:
        """The exact catalog cost (Decimal arithmetic), memoised on the token counts it reads (cleaned:
        whole numbers or None): a job's replies repeat the same counts often, and the arithmetic is the
        costliest part of reading a result."""
        key = (usage.get("input_tokens"), usage.get("output_tokens"), usage.get("cache_creation_input_tokens"),
               usage.get("cache_read_input_tokens"), split.get("ephemeral_5m_input_tokens"),
               split.get("ephemeral_1h_input_tokens"))
        try:
            return self._costs[key]
        except KeyError:
            pass
        value = _money(self.catalog.cost(self.model, usage, batch=self.batch, cache_ttl=self.cache_ttl))
        if len(self._costs) < 10_000:
            self._costs[key] = value
        return value

    def _structured(self, fields: dict, text: str, tool_input: Any) -> None:
        if tool_input is not None:
            value = tool_input
            if not text:
                fields["text"] = json.dumps(tool_input, ensure_ascii=False)
        else:
            try:
                value = json.loads(text)
            except (json.JSONDecodeError, ValueError) as exc:
                cut = " (the reply was cut at max_tokens)" if fields["stop_reason"] == "max_tokens" else ""
                fields.update(state=INVALID_OUTPUT, error_type="invalid_output",
                              error_message=f"reply is not JSON{cut}: {exc.msg} (char {exc.pos})")
                return
        problem = self._problem(value)
        if problem is not None:
            fields.update(state=INVALID_OUTPUT, error_type="invalid_output", error_message=problem[:500])
            return
        fields["parsed"] = json.dumps(value, ensure_ascii=False, sort_keys=True)

    def _problem(self, value: Any) -> Optional[str]:
        """Why a parsed reply cannot be kept — it breaks the schema, or a value does not fit its typed
        column (a number too large for int64, say) — or None."""
        try:
            error = best_match(self.validator.iter_errors(value))
        except Exception as exc:  # a schema jsonschema cannot apply: never a crash after the reply was paid for
            return f"reply cannot be checked against the schema: {str(exc).splitlines()[0]}"
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            return f"reply does not fit the schema at {where}: {error.message}"
        if not isinstance(value, dict):
            return f"reply does not fit the schema at (root): expected a JSON object, got {type(value).__name__}"
        for name, typ, convert in self.columns:
            try:
                convert(value.get(name))
            except ColumnError as exc:
                where = "/".join(str(p) for p in (name, *exc.path))
                return f"reply value at {where} does not fit column {name!r} ({typ}): {exc.reason}"
        return None


FREE, ATTEMPT = "free", "attempt"


def retry_rule(fields: dict) -> Optional[str]:
    """What a failed batch result does to its row: None (final), ATTEMPT (pending again while the row
    has attempts left: expired), or FREE (pending again, never counted against max_attempts).

    The rule messages mode follows too (errors.error_class): an errored result ends its row only when
    the error is about the request (invalid_request_error, request_too_large). Any other error type the
    API (or a gateway) puts in a result — rate_limit_error, overloaded_error, api_error, authentication,
    billing, permission, a gateway's own — is the service's: errored results are not billed, so the row
    is sent again at no cost but a round trip, and the runner stops a run that keeps meeting them."""
    if fields["state"] == EXPIRED:
        return ATTEMPT
    if fields["state"] != ERRORED:
        return None
    if fields.get("from_api"):
        return None if error_class(fields.get("error_type")) == ABOUT_REQUEST else FREE
    # made up here (e.g. no line came back for the row): as before, by its type
    return ATTEMPT if fields.get("error_type") in TRANSIENT_ERRORS else None


def _money(value: Optional[Decimal]) -> Optional[float]:
    return float(value) if value is not None else None
