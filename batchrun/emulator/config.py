"""The emulator's knobs (all settable at runtime) and the counters tests read."""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional


# error types an errored batch result can carry (errored_types), with the message each comes with
ERROR_TYPES = {"overloaded_error": "Overloaded", "api_error": "Internal server error",
               "rate_limit_error": "Rate limited", "invalid_request_error": "Invalid request (injected)",
               "not_found_error": "Not found (injected)", "permission_error": "Permission denied (injected)",
               "authentication_error": "invalid x-api-key (injected)", "billing_error": "Billing issue (injected)",
               "no_db_connection": "No connected db. (a gateway's own error type, injected)"}


@dataclass
class EmulatorConfig:
    # batches
    processing_seconds: float = 1.0      # a batch stays in_progress this long after creation
    cancel_seconds: float = 0.05         # a canceled batch stays `canceling` this long (at most until it would end)
    archive_after_seconds: Optional[float] = None   # then the batch gets archived_at; its results answer 404
    max_requests: int = 100_000          # per batch; more -> 413 request_too_large
    max_body_bytes: int = 256 * 1024 * 1024          # per create call; more -> 413 request_too_large
    max_queued_requests: Optional[int] = None       # requests of unended batches; a create past it -> 429
    # behaviour
    seed: int = 0                        # every random choice comes from random.Random(seed)
    api_key: Optional[str] = None        # when set, any other key -> 401
    validate: bool = True                # request validation (off: only what is needed to parse)
    extra_models: tuple = ()             # model names accepted besides the catalog's (a dated id of a known family keeps its rules; others only the version's)
    lean: bool = False                   # timing mode (benchmarks, not tests): tokens = ceil(characters / 4),
                                         # CRC-32 reply hashes, cheap message ids, no per-request model
                                         # checks, no prompt cache, no per-hash counters (params_submitted, billed)
    cold_batches: bool = False           # prompt caching as in a cold batch: no item reads a cache written by
                                         # another item of its batch; a write is read only by batches created
                                         # after the batch that wrote it ended (and within its TTL)
    # faults
    fault_rate: float = 0.0              # fraction of API calls answered with 429 / 500 / 529 / a dropped connection
    drop_after_create: int = 0           # the next N creates create the batch, then drop the connection
    errored_rate: float = 0.0            # fraction of requests ending errored, with a type from errored_types
    errored_types: tuple = ("overloaded_error", "api_error")   # picked evenly (e.g. "invalid_request_error")
    expired_rate: float = 0.0            # fraction of requests ending expired
    truncate_rate: float = 0.0           # fraction of results downloads cut short
    missing_result_lines: int = 0        # every results file lacks this many lines, always the same ones
    create_delay: float = 0.0            # seconds a create takes once its body is in; the batch is listed only then
    refuse_text: Optional[str] = None    # a request whose messages hold this text is refused (400 / errored
                                         # invalid_request_error): what the API refuses that batchrun cannot foresee
    off_schema_rate: float = 0.0         # fraction of schema replies (output_config.format, forced tool) that
                                         # break their schema: a constraint the API only passes on as a note
                                         # (maximum, maxItems, maxLength), else a value's type; by request hash
    retry_after: float = 0.01            # seconds advertised on injected 429s
    results_host: Optional[str] = None   # host[:port] of results_url (None: the host the request was sent to),
                                         # to serve results from another host as the API's file servers may
    # the Messages endpoint
    # (limits are token buckets, as the API's: each holds its limit and refills at limit / rate_window a second)
    rpm: Optional[int] = None            # requests per window on POST /v1/messages
    input_tpm: Optional[int] = None      # input tokens per window
    output_tpm: Optional[int] = None     # output tokens per window
    rate_window: float = 60.0            # the rate-limit window in seconds ("per minute"; less to scale time)
    wrap_messages: bool = False          # reply {"code": 200, "data": <Message>} like some gateways
    latency: float = 0.0                 # seconds to wait before a messages reply
    # gateways
    no_batches: bool = False             # the batch endpoints answer 404 {"detail": "Not Found"} (like LiteLLM)
    no_batches_reply: str = "json"       # how no_batches answers: "json" (above), "html" (404 with an HTML
                                         # page), "405" (405 Method Not Allowed, text)
    no_batches_only: str = ""            # with no_batches, only this batch route answers so ("create", "list")
    no_count_tokens: bool = False        # count_tokens answers 404 {"detail": "Not Found"}
    count_tokens_fails: bool = False     # count_tokens answers 500 api_error (a gateway whose upstream is down)
    report_output_tokens: Optional[int] = None   # every reply reports this many output tokens, whatever its
                                                 # max_tokens (LiteLLM's mock replies report 503)
    omit_usage: bool = False             # replies carry no usage at all
    openai_ratelimit_headers: bool = False   # send x-ratelimit-limit|remaining|reset-requests|tokens (as LiteLLM
                                             # and other gateways do) instead of the anthropic-ratelimit-* headers
    # a gateway's own errors: every API call (or only the next error_calls) answered with this status and type
    error_status: Optional[int] = None   # e.g. 400 (LiteLLM with a wrong key), 401, 429, 502, 529
    error_type: str = "no_db_connection" # the error.type of those replies
    error_calls: Optional[int] = None    # how many calls get that error before the emulator answers again
    usage_patch: Optional[dict] = None   # merged into every reply's usage, or the whole usage when not a dict
                                         # (a lying server: null, negative or string counts, a list)

    def update(self, changes: dict) -> None:
        """Apply a partial update (from JSON); unknown keys raise KeyError, bad types ValueError."""
        names = {f.name: f for f in dataclasses.fields(self)}
        for key in changes:
            if key not in names:
                raise KeyError(key)
        for key, value in changes.items():
            if key == "extra_models":
                if isinstance(value, str) or not isinstance(value, (list, tuple)):
                    raise ValueError("extra_models must be a list of model names")
                value = tuple(str(v) for v in value)
            elif key == "errored_types":
                if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value \
                        or any(v not in ERROR_TYPES for v in value):
                    raise ValueError(f"errored_types must be a non-empty list of: {', '.join(ERROR_TYPES)}")
                value = tuple(value)
            elif key == "usage_patch":
                pass   # any JSON value, sent as given
            elif value is None:
                if names[key].default is not None:
                    raise ValueError(f"{key} cannot be null")
            elif isinstance(names[key].default, bool) or key in ("validate", "wrap_messages", "lean",
                                                                  "openai_ratelimit_headers"):
                if not isinstance(value, bool):
                    raise ValueError(f"{key} must be true or false")
            elif key in ("api_key", "refuse_text", "error_type", "no_batches_reply", "no_batches_only"):
                value = str(value)
            elif key in ("seed", "max_requests", "max_body_bytes", "max_queued_requests", "drop_after_create",
                         "rpm", "input_tpm", "output_tpm", "report_output_tokens", "missing_result_lines",
                         "error_status", "error_calls"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
                    raise ValueError(f"{key} must be an integer")
                value = int(value)
            else:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{key} must be a number")
                value = float(value)
            setattr(self, key, value)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["extra_models"] = list(self.extra_models)
        out["errored_types"] = list(self.errored_types)
        if out["api_key"] is not None:
            out["api_key"] = "***"
        return out


@dataclass
class EmulatorStats:
    batches_created: int = 0             # batches that exist(ed): every successful create
    requests_created: int = 0            # sum of their request counts
    create_calls: int = 0                # every POST /v1/messages/batches (faulted, refused or not)
    faults: Counter = field(default_factory=Counter)          # injected faults by kind
    status_counts: Counter = field(default_factory=Counter)   # HTTP status -> replies (dropped ones not counted)
    messages_calls: int = 0              # every POST /v1/messages
    messages_429: int = 0                # of those, refused by the rate limits (rpm / tpm)
    count_tokens_calls: int = 0
    results_downloads: int = 0           # results downloads started (200)
    submitted_custom_ids: Counter = field(default_factory=Counter)   # custom_id -> times in created batches
    params_submitted: Counter = field(default_factory=Counter)       # hash of params -> times in created batches
    billed: Counter = field(default_factory=Counter)                 # hash of params -> succeeded (billed) results
    api_versions: Counter = field(default_factory=Counter)   # anthropic-version header sent -> API calls
    prefixes: Counter = field(default_factory=Counter)       # path prefix before /v1/ ("" for none) -> API calls
    # every request accepted in a batch, per batch id in creation order: [(custom_id, hash of params)],
    # kept whether or not anyone reads the batch (a batch nobody polls is paid all the same)
    accepted: dict = field(default_factory=dict)
    outcomes: dict = field(default_factory=dict)   # batch id -> each request's result type, once the batch ended

    def __getitem__(self, key: str) -> Any:  # dict-like access too
        return getattr(self, key)

    def to_dict(self) -> dict:
        return {
            "batches_created": self.batches_created,
            "requests_created": self.requests_created,
            "create_calls": self.create_calls,
            "faults": dict(self.faults),
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
            "messages_calls": self.messages_calls,
            "messages_429": self.messages_429,
            "count_tokens_calls": self.count_tokens_calls,
            "results_downloads": self.results_downloads,
            "submitted_custom_ids": dict(self.submitted_custom_ids),
            "params_submitted": dict(self.params_submitted),
            "billed": dict(self.billed),
            "api_versions": dict(self.api_versions),
            "prefixes": dict(self.prefixes),
            "accepted": {b: [list(item) for item in items] for b, items in self.accepted.items()},
            "outcomes": dict(self.outcomes),
        }
