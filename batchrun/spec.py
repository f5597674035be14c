"""The job: what to read, how to render it, which model, where to write — loaded, merged, validated.

A job comes from a TOML file, from CLI flags, or from a mapping (the library API); flags override the
file. Every key is checked here, before any input is read or any request is built, and a bad one is
reported as one line naming the key. Paths in a job file are relative to the file.
"""
from __future__ import annotations

import dataclasses
import datetime
import difflib
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import SpecError

API_VERSIONS = ("2023-06-01", "2026-10-21")   # the Anthropic API's; the only ones it accepts
# a gateway may document its own anthropic-version (a date, e.g. 2025-10-01): sent as given, with the
# rules of the first Anthropic version checked (`rules_version`)
_DATE_VERSION = re.compile(r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$")
DEFAULT_API_VERSION = API_VERSIONS[0]
EFFORT_LEVELS = ("low", "medium", "high", "xhigh", "max")   # output_config.effort
CACHE_TTLS = ("5m", "1h")                                  # cache_control.ttl
THINKING_TYPES = ("enabled", "adaptive", "disabled")       # thinking.type
MAX_BATCH_REQUESTS = 100_000
DEFAULT_MODEL = "claude-haiku-5-5"


def _is_date(text: str) -> bool:
    """YYYY-MM-DD naming a day of the calendar (not 2025-02-31)."""
    if not _DATE_VERSION.match(text):
        return False
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def rules_version(api_version: str) -> str:
    """The API version whose rules a request is checked against: a gateway's own version is unknown to
    batchrun, so the rules of 2023-06-01 are checked for it."""
    return api_version if api_version in API_VERSIONS else API_VERSIONS[0]


def check_api_version(api_version: str, endpoint: Optional[str]) -> Optional[str]:
    """Refuse a version the Anthropic API does not have (endpoint None); for a gateway, a warning."""
    if api_version in API_VERSIONS:
        return None
    if endpoint is None:
        raise SpecError(f"api_version: {api_version} is not a version of the Anthropic API (use "
                        f"{' or '.join(API_VERSIONS)}); other dates are only for a gateway's base URL")
    return (f"api_version: {api_version} is not an Anthropic API version: sent as given to {endpoint}, whose rules "
            f"for it are unknown; the rules of {API_VERSIONS[0]} are checked")


def parse_duration(value: Any, key: str) -> float:
    """Seconds from 90, 90.5, "90", "90s", "2m", "1h", "1h30m"."""
    if isinstance(value, bool):
        raise SpecError(f"{key}: expected a duration like 30, \"30s\", \"2m\" or \"1h\", got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?", text)
        if not text or "".join(n + (u or "") for n, u in parts) != text.replace(" ", ""):
            raise SpecError(f"{key}: expected a duration like 30, \"30s\", \"2m\" or \"1h\", got {value!r}")
        scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}
        seconds = sum(float(n) * scale[u] for n, u in parts)
    if seconds < 0:
        raise SpecError(f"{key}: must not be negative, got {value!r}")
    return seconds


def default_cache_ttl(mode: str, cache_system: bool) -> str:
    """The cache TTL of a job that names none: 1h for a cached batch job (the requests of a batch may run
    long after it is created, and a job sends its batches over minutes or hours), else 5m."""
    return "1h" if mode == "batch" and cache_system is True else "5m"


PRIME_MIN_ROWS = 6          # rows to send for the cache to be primed first (see batches.BatchDriver.priming)


def cached_prefix_tokens(spec: "JobSpec") -> int:
    """About how many tokens the prefix `cache_system` caches has — the system prompt and the few-shot
    turns (0: nothing is cached)."""
    if not spec.cache_system:
        return 0
    return (len(spec.system or "") + sum(len(ex["user"]) + len(ex["assistant"]) for ex in spec.few_shot or ())) // 4


def cache_minimum(model) -> Optional[int]:
    """The shortest prefix `model` (a ModelInfo, or None) caches, in tokens; None: not known. The one
    reading of the minimum: priming, pricing (estimator) and warnings (job.warnings_for) ask it."""
    return model.cache_min_tokens if model is not None else None


def prefix_cached(tokens: int, model) -> Optional[bool]:
    """Whether a cached prefix of about `tokens` tokens is written to the cache: True, False (nothing to
    cache, or below the minimum), None (the minimum is not known: not primed; an estimate spans both)."""
    if tokens <= 0:
        return False
    minimum = cache_minimum(model)
    return None if minimum is None else tokens >= minimum


def primes_cache(spec: "JobSpec", model) -> bool:
    """Whether the job's batches are sent after one request has primed the cache (see batches.BatchDriver.priming):
    batch mode, cache_prime on, and a cached prefix known to be cached (prefix_cached: not below
    the model's minimum, the warning of warnings_for; a model whose minimum is unknown is not primed)."""
    return spec.mode == "batch" and spec.cache_prime and prefix_cached(cached_prefix_tokens(spec), model) is True


MODES = ("batch", "messages")                              # Message Batches, or plain Messages
AUTH_HEADERS = ("x-api-key", "bearer")                     # how the key is sent (bearer: a gateway's Authorization)


@dataclass(frozen=True)
class Flag:
    """How a job key is given on the command line: `--key` (its name with dashes), on run, validate,
    estimate and cancel. cli/common.py makes the click options from these, so a job key is declared once,
    here, with its flag; `FILE_ONLY` marks a key that only a job file (or the library) can give."""

    help: Optional[str] = None
    metavar: Optional[str] = None
    type: Any = None                  # int or float: the CLI parses the number; None: the text, parsed here
    choices: Optional[tuple] = None   # one of these
    many: bool = False                # may be repeated (--labels a --labels b); each value read as the key's text
    switch: bool = False              # --key sets it true
    negatable: bool = False           # --key / --no-key
    old: Optional[str] = None         # an old spelling, still taken and hidden from --help


FILE_ONLY = None


def job_key(default: Any = dataclasses.MISSING, flag: Optional[Flag] = FILE_ONLY, *,
            file_key: Optional[tuple[str, Flag]] = None, path: bool = False) -> Any:
    """A job key: a field of JobSpec with its flag (FILE_ONLY: none), the `*_file` key that gives its text
    from a file (`prompt_file` for prompt) with that key's own flag, and whether it is a path (relative to
    the job file in a job file)."""
    metadata: dict = {"flag": flag, "path": path}
    if file_key is not None:
        metadata["file_key"] = file_key
    return field(default=default, metadata=metadata)


@dataclass
class JobSpec:
    """A validated job. Build with `JobSpec.load(...)` or `JobSpec.from_mapping(...)`.

    Each field made by `job_key()` is a job key, with its flag: the order here is the order of `--help`.
    """

    input: str = job_key(flag=Flag("CSV, Parquet (file or directory) or JSONL to read; local path or URI.", "PATH"),
                         path=True)
    output: str = job_key(flag=Flag("Parquet file (a directory with --partition-by) to write; local path or URI "
                                    "(default: <input>.results.parquet).", "PATH"), path=True)
    prompt: str = job_key(flag=Flag("Jinja2 template over the row's columns, e.g. 'Classify: {{ text }}'.", "TEMPLATE"),
                          file_key=("prompt_file", Flag("Read the prompt template from a file.", "PATH")))
    _: dataclasses.KW_ONLY   # the keys below are given by name
    id_column: Optional[str] = job_key(None, Flag("Column whose values become custom_ids (default: row position).",
                                                  "COL"))
    system: Optional[str] = job_key(None, Flag("System prompt.", "TEXT"),
                                    file_key=("system_file", Flag("Read the system prompt from a file.", "PATH")))
    model: str = job_key(DEFAULT_MODEL, Flag(f"Model id or alias (default: {DEFAULT_MODEL}).", "MODEL"))
    max_tokens: int = job_key(1024, Flag("Max output tokens per request (default: 1024).", "N", int))
    batch_size: int = job_key(10_000, Flag(f"Requests per batch (default: 10000; max {MAX_BATCH_REQUESTS}).", "N", int))
    poll_interval: float = job_key(60.0, Flag("Longest wait between polls, e.g. 30, 2m (default: 60s).", "DURATION"))
    state: Optional[str] = job_key(None, Flag(
        "SQLite state file, a local path (default: batchrun-state.sqlite next to the output; in the working "
        "directory when the output is a URI).", "PATH"), path=True)
    max_attempts: int = job_key(3, Flag(
        "Attempts per row that may be paid without an answer (timeout, dropped connection) or that expired; "
        "429, 529 and other service errors never use one (default: 3).", "N", int))
    api_version: str = job_key(DEFAULT_API_VERSION, Flag(
        f"anthropic-version header: {API_VERSIONS[0]} (default) or {' or '.join(API_VERSIONS[1:])}; another date "
        f"only for a gateway that documents it (its rules unknown: those of {API_VERSIONS[0]} are checked).",
        "YYYY-MM-DD"))
    mode: str = job_key("batch", Flag("Message Batches (default) or plain Messages.", choices=MODES))
    # structured output
    output_schema: Optional[dict] = job_key(None, Flag(
        "JSON Schema file: each top-level property becomes a typed column.", "FILE"))
    labels: Optional[list] = job_key(None, Flag("Label set: the reply is one of these (column 'label').", "A,B,C",
                                                many=True))
    multi_label: bool = job_key(False, Flag("With --labels: a list of labels per row.", switch=True))
    # prompt caching
    cache_system: bool = job_key(False, Flag("Send the system prompt (and the few-shot turns) as a cached prefix.",
                                             negatable=True))
    # None: "1h" for a cached batch job (batches may outlast 5 minutes), else "5m"
    cache_ttl: Optional[str] = job_key(None, Flag(
        "Cache lifetime for --cache-system (default: 1h in batch mode, 5m in messages mode).", choices=CACHE_TTLS))
    cache_prime: bool = job_key(True, Flag(   # (see primes_cache)
        "Batch mode, cached prefix: send one request alone first to write the cache, then the rest to read it "
        "(default: on).", negatable=True))
    # model parameters
    temperature: Optional[float] = job_key(None, Flag("Sampling temperature (refused by models that take none).",
                                                      type=float))
    top_p: Optional[float] = job_key(None, Flag("Nucleus sampling: between 0 and 1.", type=float))
    top_k: Optional[int] = job_key(None, Flag("Sample only from the K most likely tokens.", type=int))
    thinking: Optional[dict] = job_key(None, Flag("Thinking mode, or a budget of N tokens.", "adaptive|disabled|N"))
    effort: Optional[str] = job_key(None, Flag("Effort (output_config.effort), for models that take it.",
                                               choices=EFFORT_LEVELS))
    stop_sequences: Optional[list] = job_key(None, Flag("Stop generating at this text (repeat for several).", "TEXT",
                                                        many=True, old="--stop-sequence"))
    metadata: Optional[dict] = job_key(None, FILE_ONLY)
    # richer prompts
    few_shot: Optional[list] = job_key(None, FILE_ONLY)
    prefill: Optional[str] = job_key(None, Flag(
        "Start of the reply; the model continues it (column text holds the continuation).", "TEXT"))
    prefill_in_text: bool = job_key(False, Flag("With --prefill: column text holds the prefill followed by the "
                                                "continuation.", switch=True))
    image_column: Optional[str] = job_key(None, Flag("Column with an image path, URL or bytes per row.", "COL"))
    image_dir: Optional[str] = job_key(None, Flag(
        "Folder relative image paths are read from (default: the input file's).", "DIR"), path=True)
    max_tokens_column: Optional[str] = job_key(None, Flag("Column with a per-row max_tokens.", "COL"))
    # cost and limits
    max_cost: Optional[float] = job_key(None, Flag("Budget: never spend more than this on the job.", "USD", float))
    limit: Optional[int] = job_key(None, Flag("Only the first N rows (a smoke run).", "N", int))
    # "K/N": only this shard's rows (see shard_of)
    shard: Optional[str] = job_key(None, Flag(
        "Only shard K of N (rows split by a hash of the id column, or by position without one); run each shard "
        "as its own job with its own state and output.", "K/N"))
    # messages mode and gateways
    concurrency: int = job_key(8, Flag("Messages mode: requests in flight at once.", "N", int))
    rpm: Optional[int] = job_key(None, Flag("Messages mode: cap on requests per minute.", type=int))
    tpm: Optional[int] = job_key(None, Flag("Messages mode: cap on tokens per minute.", type=int))
    auth_header: str = job_key("x-api-key", Flag("How the key is sent: an x-api-key header (default), or "
                                                 "Authorization: Bearer (for a gateway).", choices=AUTH_HEADERS))
    headers: Optional[dict] = job_key(None, FILE_ONLY)
    # output
    partition_by: Optional[str] = job_key(None, Flag(
        "Write a Hive-partitioned Parquet dataset (OUTPUT/COL=value/part-N.parquet) by this input, result or "
        "schema column.", "COL"))
    # models
    models_file: Optional[str] = job_key(None, Flag(
        "Extra model catalog (TOML) to extend or override the built-in one.", "FILE", old="--models"), path=True)
    allow_unknown_model: bool = job_key(False, Flag("Run a model the catalog does not know (its cost stays unknown).",
                                                    switch=True))
    name: Optional[str] = job_key(None, Flag("A name for the job (shown by status).", "NAME"))
    # where the spec came from (not a job key, not part of the job's identity)
    source: Optional[str] = field(default=None, compare=False)
    # whether cache_ttl was left to its default (see _validate; not a job key)
    cache_ttl_defaulted: bool = field(default=False, compare=False)

    # ---- identity -------------------------------------------------------------------------
    # Fields that shape what is sent, and so what is paid for. Anything else (where the output
    # goes, batch size, poll interval, budget) can change without making a new job.
    IDENTITY_FIELDS = (
        "id_column", "prompt", "system", "model", "max_tokens", "api_version", "mode",
        "output_schema", "labels", "multi_label", "cache_system", "cache_ttl", "temperature",
        "top_p", "top_k", "thinking", "effort", "stop_sequences", "metadata", "few_shot",
        "prefill", "image_column", "max_tokens_column", "limit",
    )

    @property
    def shard_pair(self) -> Optional[tuple[int, int]]:
        """(K, N) of `shard`, or None."""
        if self.shard is None:
            return None
        k, n = self.shard.split("/")
        return int(k), int(n)

    def identity(self, input_fingerprint: str, endpoint: Optional[str] = None,
                 models: Optional[str] = None) -> str:
        """The job's id: everything that shapes its requests, its input's fingerprint, the service it is
        sent to when that is not the Anthropic API (see `endpoint_key`), and the content of its extra
        model catalog when it has one (`Catalog.fingerprint`: what is sent, and how it is priced)."""
        shaped = {k: getattr(self, k) for k in self.IDENTITY_FIELDS}
        shaped["input"] = input_fingerprint
        if self.shard is not None:   # only when set: jobs from before sharding keep their identity
            shaped["shard"] = self.shard
        if endpoint is not None:     # likewise: jobs sent to the Anthropic API keep their identity
            shaped["endpoint"] = endpoint
        if models is not None:       # and jobs on the shipped catalog alone
            shaped["models"] = models
        blob = json.dumps(shaped, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]   # 80 bits: ample for the jobs of one state file

    def to_json(self) -> str:
        """The spec as stored in the state file (it never holds a key)."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if k in JOB_KEYS}   # (not where it came from)
        if data.get("headers"):  # gateway headers may carry credentials: keep their names only
            data["headers"] = {name: "<redacted>" for name in data["headers"]}
        return json.dumps(data, sort_keys=True, default=str)

    @property
    def state_path(self) -> str:
        if self.state:
            return self.state
        out = self.output
        if "://" in out:
            return "batchrun-state.sqlite"
        return str(Path(out).parent / "batchrun-state.sqlite")

    # ---- loading --------------------------------------------------------------------------
    @classmethod
    def load(cls, job_file: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> "JobSpec":
        """Read a TOML job file (optional) and apply overrides (CLI flags; None values ignored)."""
        raw: dict = {}
        base = Path.cwd()
        source = None
        if job_file:
            path = Path(job_file)
            source = str(path)
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise SpecError(f"{job_file}: job file not found") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise SpecError(f"{job_file}: cannot read job file ({exc})") from None
            try:
                raw = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                raise SpecError(f"{job_file}: not valid TOML: {exc}") from None
            base = path.resolve().parent
            raw = _resolve_paths(raw, base, job_file)
            _check_alternatives(raw, f"{job_file}: ")
        overrides = _resolve_paths(dict(overrides or {}), Path.cwd(), None)
        _check_alternatives(overrides, "")
        return cls.from_mapping(merge(raw, overrides), source=source)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], source: Optional[str] = None) -> "JobSpec":
        where = f"{source}: " if source else ""
        raw = dict(raw)
        known = set(JOB_KEYS) | set(_FILE_KEYS)
        for key in raw:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SpecError(f"{where}unknown key {key!r}{hint}")
        _check_alternatives(raw, where)
        # *_file keys hold text read from a file
        for key, target in _FILE_KEYS.items():
            if key in raw:
                raw[target] = _read_text(raw.pop(key), key, where)
        if isinstance(raw.get("output_schema"), str):
            raw["output_schema"] = _read_json(raw["output_schema"], "output_schema", where)
        if raw.get("input") in (None, ""):
            raise SpecError(f"{where}missing key 'input' (the CSV, Parquet or JSONL file to read)")
        if raw.get("prompt") in (None, ""):
            raise SpecError(f"{where}missing key 'prompt' (or 'prompt_file'): the template for each row")
        if not raw.get("output"):
            raw["output"] = _default_output(str(raw["input"]))
        spec = cls(**{k: v for k, v in raw.items()}, source=source)
        spec._validate(where)
        return spec

    # ---- validation -----------------------------------------------------------------------
    def _validate(self, where: str) -> None:
        def need(cond: bool, key: str, what: str) -> None:
            if not cond:
                raise SpecError(f"{where}{key}: {what}, got {getattr(self, key)!r}")

        for key in ("input", "output", "prompt", "model"):
            need(isinstance(getattr(self, key), str) and getattr(self, key) != "", key, "expected a non-empty string")
        for key in ("name", "id_column", "system", "state", "prefill", "image_column", "image_dir", "max_tokens_column",
                    "partition_by", "models_file", "effort"):
            need(getattr(self, key) is None or isinstance(getattr(self, key), str), key, "expected a string")
        self.max_tokens = _as_int(self.max_tokens, "max_tokens", where)
        need(self.max_tokens >= 1, "max_tokens", "must be at least 1")
        self.batch_size = _as_int(self.batch_size, "batch_size", where)
        need(1 <= self.batch_size <= MAX_BATCH_REQUESTS, "batch_size",
             f"must be between 1 and {MAX_BATCH_REQUESTS:,} (the API's limit per batch)")
        self.max_attempts = _as_int(self.max_attempts, "max_attempts", where)
        need(1 <= self.max_attempts <= 20, "max_attempts", "must be between 1 and 20")
        self.poll_interval = parse_duration(self.poll_interval, f"{where}poll_interval")
        need(self.poll_interval >= 0.01, "poll_interval", "must be positive")
        if isinstance(self.api_version, datetime.date):   # TOML reads api_version = 2025-10-01 as a date
            self.api_version = self.api_version.isoformat()
        if isinstance(self.api_version, str):
            self.api_version = self.api_version.strip()
        need(isinstance(self.api_version, str) and _is_date(self.api_version), "api_version",
             f"must be a date (YYYY-MM-DD): {' or '.join(API_VERSIONS)} for the Anthropic API, or the version a "
             "gateway documents")
        need(self.mode in MODES, "mode", "must be " + " or ".join(map(repr, MODES)))
        if self.cache_ttl is None:
            self.cache_ttl = default_cache_ttl(self.mode, self.cache_system)
            self.cache_ttl_defaulted = True
        need(self.cache_ttl in CACHE_TTLS, "cache_ttl", "must be " + " or ".join(map(repr, CACHE_TTLS)))
        for key in ("multi_label", "cache_system", "cache_prime", "allow_unknown_model", "prefill_in_text"):
            need(isinstance(getattr(self, key), bool), key, "expected true or false")
        for key in ("temperature", "top_p", "max_cost"):
            value = getattr(self, key)
            need(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)),
                 key, "expected a number")
        if self.max_cost is not None:
            need(self.max_cost >= 0, "max_cost", "must not be negative")
        for key in ("temperature", "top_p"):   # the API refuses anything else with a 400
            need(getattr(self, key) is None or 0 <= getattr(self, key) <= 1, key, "must be between 0 and 1")
        if self.top_k is not None:
            self.top_k = _as_int(self.top_k, "top_k", where)
            need(self.top_k >= 1, "top_k", "must be at least 1")
        if self.limit is not None:
            self.limit = _as_int(self.limit, "limit", where)
            need(self.limit >= 1, "limit", "must be at least 1")
        if self.shard is not None:
            shard = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(self.shard))
            need(shard is not None and 1 <= int(shard[1]) <= int(shard[2]), "shard",
                 "expected K/N with 1 <= K <= N (e.g. 3/16: the third of sixteen shards)")
            self.shard = f"{int(shard[1])}/{int(shard[2])}"
        self.concurrency = _as_int(self.concurrency, "concurrency", where)
        need(1 <= self.concurrency <= 512, "concurrency", "must be between 1 and 512")
        for key in ("rpm", "tpm"):
            if getattr(self, key) is not None:
                setattr(self, key, _as_int(getattr(self, key), key, where))
                need(getattr(self, key) >= 1, key, "must be at least 1")
        need(self.auth_header in AUTH_HEADERS, "auth_header", "must be " + " or ".join(map(repr, AUTH_HEADERS)))
        if self.headers is not None:
            need(isinstance(self.headers, dict) and all(isinstance(v, str) for v in self.headers.values()),
                 "headers", "expected a table of strings")
            for name in self.headers:
                if name.lower() in ("x-api-key", "authorization"):
                    raise SpecError(f"{where}headers: {name!r} must not be set in a job file "
                                    "(the key comes from ANTHROPIC_API_KEY or --api-key)")
        if isinstance(self.stop_sequences, (str, tuple)):   # one sequence, as one --stop-sequences gives
            self.stop_sequences = [self.stop_sequences] if isinstance(self.stop_sequences, str) else \
                list(self.stop_sequences)
        if self.stop_sequences is not None:
            need(isinstance(self.stop_sequences, list) and all(isinstance(s, str) and s for s in self.stop_sequences),
                 "stop_sequences", "expected a list of non-empty strings")
        if self.metadata is not None:
            need(isinstance(self.metadata, dict), "metadata", "expected a table such as {user_id = \"...\"}")
            for key, value in self.metadata.items():
                if key != "user_id":
                    raise SpecError(f"{where}metadata: unknown key {key!r} (the API accepts only user_id, "
                                    "an opaque id of the end user)")
                if value is not None and not (isinstance(value, str) and len(value) <= 256):
                    raise SpecError(f"{where}metadata: user_id must be a string of at most 256 characters, "
                                    f"got {value!r}"[:200])
        if self.thinking is not None:
            # one rule for the key and --thinking: "adaptive", "disabled", N (a budget of N tokens) or a table
            if isinstance(self.thinking, str) and re.fullmatch(r"\s*[+-]?\d+\s*", self.thinking):
                self.thinking = int(self.thinking)
            if isinstance(self.thinking, int) and not isinstance(self.thinking, bool):
                self.thinking = {"type": "enabled", "budget_tokens": self.thinking}
            elif isinstance(self.thinking, str) and self.thinking.strip() in THINKING_TYPES:
                self.thinking = {"type": self.thinking.strip()}   # (any other text is refused as it was given)
            need(isinstance(self.thinking, dict) and self.thinking.get("type") in THINKING_TYPES,
                 "thinking", "expected \"adaptive\", \"disabled\", a budget of N tokens, or "
                 "{type = \"enabled\", budget_tokens = N}")
            if self.thinking["type"] == "enabled":
                need(isinstance(self.thinking.get("budget_tokens"), int), "thinking",
                     "type \"enabled\" needs budget_tokens")
        if self.effort is not None:
            need(self.effort in EFFORT_LEVELS, "effort", "must be one of " + ", ".join(EFFORT_LEVELS))
        if isinstance(self.labels, (str, tuple)):   # "a,b,c" (as --labels takes it), or repeated flags
            parts = [self.labels] if isinstance(self.labels, str) else list(self.labels)
            self.labels = [x.strip() for p in parts if isinstance(p, str) for x in p.split(",") if x.strip()]
        if self.labels is not None:
            need(isinstance(self.labels, list) and len(self.labels) >= 2 and
                 all(isinstance(x, str) and x for x in self.labels) and len(set(self.labels)) == len(self.labels),
                 "labels", "expected a list of at least two distinct non-empty strings")
        if self.multi_label and self.labels is None:
            raise SpecError(f"{where}multi_label: needs 'labels'")
        if self.prefill_in_text and self.prefill is None:
            raise SpecError(f"{where}prefill_in_text: needs 'prefill'")
        if self.output_schema is not None:
            need(isinstance(self.output_schema, dict) and self.output_schema.get("type", "object") == "object"
                 and isinstance(self.output_schema.get("properties"), dict) and self.output_schema["properties"],
                 "output_schema", "expected a JSON Schema object with 'properties'")
            from .schema_types import schema_problem   # (jsonschema and pyarrow: only for a schema)
            problem = schema_problem(self.output_schema)
            if problem:
                raise SpecError(f"{where}output_schema: {problem}")
        if self.prefill is not None:
            need(self.prefill == self.prefill.rstrip(), "prefill",
                 "must not end with whitespace (the API refuses a final assistant message that does)")
            if self.output_schema is not None or self.labels is not None:
                raise SpecError(f"{where}prefill: cannot be used with {'labels' if self.labels else 'output_schema'} "
                                "(the API refuses a prefill with structured output, and the reply must be the "
                                "JSON alone); drop the prefill")
        if self.few_shot is not None:
            ok = isinstance(self.few_shot, list) and all(
                isinstance(ex, dict) and set(ex) == {"user", "assistant"}
                and all(isinstance(v, str) for v in ex.values()) for ex in self.few_shot)
            need(ok, "few_shot", "expected a list of {user = \"...\", assistant = \"...\"} tables")
        if self.mode == "batch" and self.output.startswith(("http://", "https://")):
            raise SpecError(f"{where}output: cannot write to a web address")


def job_flags() -> list[tuple[str, Flag]]:
    """(key, flag) of every job key the command line gives, in JobSpec's order, each `*_file` key right after
    the key it fills: what the CLI's job options are made of."""
    out = []
    for f in dataclasses.fields(JobSpec):
        if f.metadata.get("flag") is not None:
            out.append((f.name, f.metadata["flag"]))
        if "file_key" in f.metadata:
            out.append(f.metadata["file_key"])
    return out


# The job keys (JobSpec's fields made by job_key()), with their flags (FILE_ONLY: None); the *_file keys
# that give a key's text from a file (prompt_file -> prompt).
JOB_KEYS = {f.name: f.metadata["flag"] for f in dataclasses.fields(JobSpec) if "flag" in f.metadata}
_FILE_KEYS = {f.metadata["file_key"][0]: f.name for f in dataclasses.fields(JobSpec) if "file_key" in f.metadata}
# Keys that say the same thing two ways: a job gives at most one of each group, and an override of
# one replaces the others (a flag --prompt-file replaces the file's prompt; --output-schema its labels).
_ALTERNATIVES = (("prompt", "prompt_file"), ("system", "system_file"), ("labels", "output_schema"))
# what goes with a key an override replaces (multi_label belongs to labels)
_REPLACES = {"labels": ("multi_label",)}


def _given(value: Any) -> bool:
    return not (value is None or value == () or value == [])


def _check_alternatives(raw: Mapping[str, Any], where: str) -> None:
    for group in _ALTERNATIVES:
        present = [key for key in group if _given(raw.get(key))]
        if len(present) > 1:
            raise SpecError(f"{where}give either {present[0]!r} or {present[1]!r}, not both")


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """`base` (a job file's keys) with `overrides` (flags) on top. An override replaces the base's
    alternatives too: --prompt-file drops the file's prompt, --labels its output_schema. Both keys of
    one group among the overrides stay an error (from_mapping reports it). None (or an empty list)
    is no override."""
    overrides = {k: v for k, v in overrides.items() if _given(v)}
    out = dict(base)
    for key in overrides:
        for group in _ALTERNATIVES:
            if key in group:
                for other in group:
                    if other != key and other not in overrides:
                        out.pop(other, None)
                        for extra in _REPLACES.get(other, ()):
                            if extra not in overrides:
                                out.pop(extra, None)
    out.update(overrides)
    return out
_PATH_KEYS = (*(f.name for f in dataclasses.fields(JobSpec) if f.metadata.get("path")), *_FILE_KEYS)


def _resolve_paths(raw: dict, base: Path, job_file: Optional[str]) -> dict:
    out = dict(raw)
    for key in _PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and "://" not in value:
            out[key] = os.path.normpath(base / os.path.expanduser(value)) if job_file else os.path.expanduser(value)
    schema = out.get("output_schema")
    if isinstance(schema, str) and "://" not in schema:
        out["output_schema"] = (os.path.normpath(base / os.path.expanduser(schema)) if job_file
                                else os.path.expanduser(schema))
    return out


def _read_text(path: Any, key: str, where: str) -> str:
    if not isinstance(path, str):
        raise SpecError(f"{where}{key}: expected a file path, got {path!r}")
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{where}{key}: file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{where}{key}: cannot read {path}: {exc}") from None


def _read_json(path: str, key: str, where: str) -> Any:
    text = _read_text(path, key, where)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{where}{key}: {path} is not valid JSON: {exc}") from None


def _as_int(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool):
        raise SpecError(f"{where}{key}: expected a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*\d[\d_]*\s*", value):
        return int(value.replace("_", ""))
    raise SpecError(f"{where}{key}: expected a whole number, got {value!r}")


def _default_output(input_path: str) -> str:
    if "://" in input_path:
        raise SpecError("missing key 'output' (required when the input is a URI)")
    p = Path(input_path)
    stem = p.name.split(".")[0] if p.name else "input"
    return str(p.parent / f"{stem}.results.parquet")
