"""The model catalog: prices and capabilities per model, loaded from a data file users can extend.

The shipped catalog is `batchrun/data/models.toml` (its header documents the format). A user file
in the same format — `load_catalog(path)`, or the `BATCHRUN_MODELS` environment variable — is merged
over it: a table under an existing id or alias overrides the fields it sets, a new id adds a model.
"""
from __future__ import annotations

import difflib
import hashlib
import os
import re
import sys
from dataclasses import dataclass, fields, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .spec import API_VERSIONS, CACHE_TTLS, EFFORT_LEVELS, THINKING_TYPES

ENV_VAR = "BATCHRUN_MODELS"
THINKING_DEFAULTS = ("off", "adaptive")
SAMPLING_PARAMS = ("temperature", "top_p", "top_k")
NO_SAMPLING_VERSION = API_VERSIONS[1]  # 2026-10-21: this API version (and, we assume, later ones) refuses sampling params
MIN_THINKING_BUDGET = 1024
_MILLION_EXP = -6


class CatalogError(Exception):
    """A malformed catalog file. The message is one line naming the file and the key at fault."""


class UnknownModel(LookupError):
    """Raised by `Catalog.require` for a name that is neither an id nor an alias."""


@dataclass(frozen=True)
class Prices:
    """USD per million tokens at the standard (non-batch) rate. None: not known (never costed as 0)."""
    input: Decimal
    output: Decimal
    cache_write_5m: Optional[Decimal] = None
    cache_write_1h: Optional[Decimal] = None
    cache_read: Optional[Decimal] = None


@dataclass(frozen=True)
class PriceTier:
    above_prompt_tokens: int  # applies when input + cache write + cache read tokens of one request exceed this
    prices: Prices


@dataclass(frozen=True)
class ModelInfo:
    id: str
    aliases: tuple
    prices: Optional[Prices]          # None: unpriced (never costed as 0)
    tiers: tuple                      # of PriceTier, ascending
    sampling: bool                    # accepts temperature/top_p/top_k under 2023-06-01
    forced_tool: bool                 # accepts tool_choice {"type": "tool"|"any"}
    structured_output: bool           # accepts output_config.format json_schema
    thinking: tuple                   # accepted thinking types: subset of ("enabled", "adaptive", "disabled")
    thinking_default: str             # "off" or "adaptive": what the model does when `thinking` is not sent
    effort: bool                      # accepts output_config.effort
    cache_min_tokens: Optional[int]   # None: unknown
    new_tokenizer: bool               # counts ~30% more tokens for the same text
    max_output_tokens: Optional[int]

    @property
    def names(self) -> tuple:
        return (self.id, *self.aliases)

    def prices_for(self, prompt_tokens: int) -> Optional[Prices]:
        """The prices of one request whose prompt (input + cache write + cache read) has this many tokens."""
        chosen = self.prices
        for tier in self.tiers:
            if prompt_tokens > tier.above_prompt_tokens:
                chosen = tier.prices
        return chosen


# A dated model id: a family's name and a snapshot date (claude-opus-5-5-20261015)
_DATED_ID = re.compile(r"^(?P<family>.+)-(?P<date>20\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))$")


class Catalog:
    def __init__(self, models: Iterable[ModelInfo] = (), fingerprint: Optional[str] = None):
        self.fingerprint = fingerprint   # a hash of the user's model file(s) merged in; None: the shipped one alone
        self._models: dict[str, ModelInfo] = {}
        self._by_name: dict[str, str] = {}
        for model in models:
            for name in model.names:
                if self._by_name.setdefault(name, model.id) != model.id:
                    raise ValueError(f"model name {name!r} is used by both {self._by_name[name]} and {model.id}")
            self._models[model.id] = model

    def models(self) -> tuple:
        """Every model, in catalog order."""
        return tuple(self._models.values())

    def resolve(self, name: str, dated: bool = True) -> Optional[ModelInfo]:
        """The model with this id or alias (exact, case-sensitive), or None.

        With `dated`, a dated id the catalog lacks of a family it knows (`claude-opus-5-5-20261015`: a
        newer snapshot of claude-opus-5-5) resolves to that family's entry, its prices and its rules
        (see `is_listed` to tell the two apart)."""
        model_id = self._by_name.get(name)
        if model_id is None and dated and isinstance(name, str):
            m = _DATED_ID.match(name)
            if m and not _DATED_ID.match(m["family"]):
                model_id = self._by_name.get(m["family"])
        return None if model_id is None else self._models[model_id]

    def is_listed(self, name: str) -> bool:
        """Whether `name` is an id or alias of the catalog itself (not a dated id of a known family)."""
        return name in self._by_name

    def require(self, name: str) -> ModelInfo:
        """Like `resolve`, but an unknown name raises `UnknownModel` with close matches in its message."""
        model = self.resolve(name)
        if model is None:
            close = difflib.get_close_matches(name, list(self._by_name), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UnknownModel(f"unknown model {name!r}{hint}; add it with a models file ({ENV_VAR})")
        return model

    def cost(self, model: str, usage: Mapping, *, batch: bool, cache_ttl: str = "5m") -> Optional[Decimal]:
        """USD cost of one request's `usage`, or None when the model or a needed price is unknown: the
        total of its `cost_by_kind` (summed here at once: the run prices every reply)."""
        priced = self._priced(model, usage, cache_ttl, None)
        if priced is None:
            return None
        total = _ZERO
        for count, price in zip(*priced):
            if count:
                if price is None:
                    return None
                total += count * price
        total = total.scaleb(_MILLION_EXP)
        return total * _BATCH if batch else total

    def cost_by_kind(self, model: str, usage: Mapping, *, batch: bool, cache_ttl: str = "5m",
                     prompt_tokens: Optional[int] = None) -> Optional["CostByKind"]:
        """USD per token kind of `usage` (see CostByKind), or None when the model or a needed price is
        unknown. Its total is `cost`; status, the run summary and the report sum these figures over a
        job's rows, so that they add up to its cost_usd.

        The price tier is the one of the request's prompt, or of `prompt_tokens` when given: a sum of
        the usages of rows of one tier is priced as one request (see summary.job_pricing)."""
        priced = self._priced(model, usage, cache_ttl, prompt_tokens)
        if priced is None:
            return None
        counts, prices = priced
        figures = []
        for count, price in zip((*counts, counts[2] + counts[3] + counts[4]), (*prices, prices[0])):
            if not count:
                figures.append(_ZERO)
                continue
            if price is None:
                return None
            figure = (count * price).scaleb(_MILLION_EXP)
            figures.append(figure * _BATCH if batch else figure)
        return CostByKind(*figures)

    def _priced(self, model: str, usage: Mapping, cache_ttl: str, prompt_tokens: Optional[int]
                ) -> Optional[tuple[tuple, tuple]]:
        """The token counts of `usage` per kind (input, output, cache write 5m, cache write 1h, cache read)
        and the price of each (USD per million, None: not known); None when the model is unpriced.

        Cache writes are split by `usage["cache_creation"]` when present; writes it does not account
        for are billed at the `cache_ttl` rate ("5m" or "1h"). The tier is the one of the prompt (input +
        cache write + cache read tokens), or of `prompt_tokens` when given."""
        if cache_ttl not in CACHE_TTLS:
            raise ValueError(f"cache_ttl must be '5m' or '1h', not {cache_ttl!r}")
        info = self.resolve(model)
        if info is None or info.prices is None:
            return None
        input_tokens = _tokens(usage, "input_tokens")
        output_tokens = _tokens(usage, "output_tokens")
        read = _tokens(usage, "cache_read_input_tokens")
        written = _tokens(usage, "cache_creation_input_tokens")
        split = usage.get("cache_creation")
        split = split if isinstance(split, Mapping) else {}
        write_5m = _tokens(split, "ephemeral_5m_input_tokens")
        write_1h = _tokens(split, "ephemeral_1h_input_tokens")
        rest = max(0, written - write_5m - write_1h)
        if cache_ttl == "5m":
            write_5m += rest
        else:
            write_1h += rest
        if prompt_tokens is None:
            prompt_tokens = input_tokens + write_5m + write_1h + read
        prices = info.prices_for(prompt_tokens)
        return ((input_tokens, output_tokens, write_5m, write_1h, read),
                (prices.input, prices.output, prices.cache_write_5m, prices.cache_write_1h, prices.cache_read))


_ZERO = Decimal(0)
_BATCH = Decimal("0.5")


@dataclass(frozen=True)
class CostByKind:
    """USD per token kind of one request, or summed over many (`+`), the batch discount applied; and
    what the cache tokens (written and read) would have cost as plain input, for what caching saved."""
    input: Decimal = _ZERO
    output: Decimal = _ZERO
    cache_write_5m: Decimal = _ZERO
    cache_write_1h: Decimal = _ZERO
    cache_read: Decimal = _ZERO
    cache_as_input: Decimal = _ZERO

    KINDS = ("input", "output", "cache_write", "cache_read")   # as status, the summary and the report show them

    def __add__(self, other: "CostByKind") -> "CostByKind":
        return CostByKind(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def cache_write(self) -> Decimal:
        return self.cache_write_5m + self.cache_write_1h

    @property
    def total(self) -> Decimal:
        return self.input + self.output + self.cache_write_5m + self.cache_write_1h + self.cache_read

    @property
    def cache_saved(self) -> Decimal:
        """What prompt caching saved against sending the same tokens uncached (negative: what it cost more)."""
        return self.cache_as_input - self.cache_write - self.cache_read

    def shown(self) -> dict:
        """{input, output, cache_write, cache_read} in USD (floats): the figures add up to `total`."""
        return {k: float(getattr(self, k)) for k in self.KINDS}

    def cache_write_by_ttl(self) -> dict:
        """The cache writes' cost by lifetime: {"5m": USD, "1h": USD}."""
        return {"5m": float(self.cache_write_5m), "1h": float(self.cache_write_1h)}


def _tokens(usage: Mapping, key: str) -> int:
    value = usage.get(key)
    return 0 if value is None else int(value)


# ------------------------------------------------------------------------------------------ loading

_PRICE_FIELDS = tuple(f.name for f in fields(Prices))
_BOOL_FIELDS = ("sampling", "forced_tool", "structured_output", "effort", "new_tokenizer")
_OPTIONAL_INT_FIELDS = ("cache_min_tokens", "max_output_tokens")
# Fields a new model must set (unless it starts from another with `like`); the rest default to unknown/none.
_REQUIRED_FIELDS = (*_BOOL_FIELDS, "thinking", "thinking_default")
_ENTRY_KEYS = {"aliases", "prices", "tiers", "like", "thinking", "thinking_default",
               *_BOOL_FIELDS, *_OPTIONAL_INT_FIELDS}


def shipped_catalog_path() -> Path:
    return Path(__file__).with_name("data") / "models.toml"


def load_catalog(extra_path: Union[str, os.PathLike, None] = None) -> Catalog:
    """The shipped catalog, merged with `extra_path` (or the file named by $BATCHRUN_MODELS)."""
    if extra_path is None:
        extra_path = os.environ.get(ENV_VAR) or None
    models: dict[str, ModelInfo] = {}
    _merge_file(models, shipped_catalog_path())
    fingerprint = None
    if extra_path is not None:
        fingerprint = hashlib.sha256(_merge_file(models, Path(extra_path)).encode("utf-8")).hexdigest()
    return Catalog(models.values(), fingerprint=fingerprint)


def _merge_file(models: dict[str, ModelInfo], path: Path) -> str:
    """Merge the models of one catalog file into `models`; returns the file's text."""
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text, parse_float=Decimal)
    except OSError as e:
        raise CatalogError(f"{path}: cannot read the models file: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CatalogError(f"{path}: not valid TOML: {e}") from None
    unknown = set(data) - {"models"}
    if unknown:
        raise CatalogError(f"{path}: unknown top-level key {sorted(unknown)[0]!r} (expected [models.<id>] tables)")
    entries = data.get("models", {})
    if not isinstance(entries, dict):
        raise CatalogError(f"{path}: 'models' must be a table of [models.<id>] tables")
    for key, entry in entries.items():
        _Entry(path, key).apply(models, entry)
    return text


class _Entry:
    """Validates one [models.<key>] table of one file and merges it into `models`."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key

    def fail(self, field: str, problem: str) -> CatalogError:
        where = f"model {self.key!r}" + (f", key {field!r}" if field else "")
        return CatalogError(f"{self.path}: {where}: {problem}")

    def apply(self, models: dict[str, ModelInfo], entry: Any) -> None:
        if not isinstance(entry, dict):
            raise self.fail("", "must be a table")
        for field in entry:
            if field not in _ENTRY_KEYS:
                raise self.fail(field, f"unknown key (expected one of {', '.join(sorted(_ENTRY_KEYS))})")
        changes = {f: self.parse(f, v) for f, v in entry.items() if f not in ("like", "prices", "aliases")}
        aliases = self.parse_aliases(entry.get("aliases", []))
        owner = _owner(models, self.key)
        if owner is not None:  # override an existing model
            if "like" in entry:
                raise self.fail("like", f"only a new model can use 'like'; {self.key!r} is already {owner.id}")
            changes["prices"] = self.parse_prices("prices", entry.get("prices"), owner.prices)
            changes["aliases"] = owner.aliases + tuple(a for a in aliases if a not in owner.names)
            model = replace(owner, **changes)
        else:  # a new model
            base = None
            if "like" in entry:
                base = _owner(models, entry["like"]) if isinstance(entry["like"], str) else None
                if base is None:
                    raise self.fail("like", f"{entry['like']!r} is not a known model id or alias")
            missing = [f for f in _REQUIRED_FIELDS if f not in changes] if base is None else []
            if missing:
                raise self.fail(missing[0], "missing (a new model must set it, or start from one with 'like')")
            # `like` copies capabilities, never prices: a new model is unpriced unless its entry prices it.
            changes["prices"] = self.parse_prices("prices", entry.get("prices"), None)
            changes.setdefault("tiers", ())
            changes.update(id=self.key, aliases=tuple(a for a in aliases if a != self.key))
            if base is not None:
                model = replace(base, **changes)
            else:
                model = ModelInfo(**{"cache_min_tokens": None, "max_output_tokens": None, **changes})
        for alias in model.aliases:
            other = _owner(models, alias)
            if other is not None and other.id != model.id:
                raise self.fail("aliases", f"{alias!r} already names {other.id}")
        models[model.id] = model

    def parse(self, field: str, value: Any) -> Any:
        if field in _BOOL_FIELDS:
            if not isinstance(value, bool):
                raise self.fail(field, "must be true or false")
            return value
        if field in _OPTIONAL_INT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise self.fail(field, "must be a positive integer (omit it when unknown)")
            return value
        if field == "thinking":
            if not isinstance(value, list) or any(t not in THINKING_TYPES for t in value):
                raise self.fail(field, f"must be a list of {', '.join(map(repr, THINKING_TYPES))}")
            return tuple(dict.fromkeys(value))
        if field == "thinking_default":
            if value not in THINKING_DEFAULTS:
                raise self.fail(field, f"must be {' or '.join(map(repr, THINKING_DEFAULTS))}")
            return value
        if field == "tiers":
            return self.parse_tiers(value)
        raise AssertionError(field)  # pragma: no cover

    def parse_aliases(self, value: Any) -> tuple:
        if not isinstance(value, list) or not all(isinstance(a, str) and a for a in value):
            raise self.fail("aliases", "must be a list of model names")
        return tuple(dict.fromkeys(value))

    def parse_prices(self, field: str, value: Any, base: Optional[Prices]) -> Optional[Prices]:
        """A `prices` table merged figure by figure over `base`; figures left out stay as in `base` (or unknown)."""
        if value is None:
            return base
        if not isinstance(value, dict):
            raise self.fail(field, "must be a table of USD-per-million figures")
        figures = {} if base is None else {f: getattr(base, f) for f in _PRICE_FIELDS}
        for name, figure in value.items():
            if name not in _PRICE_FIELDS:
                raise self.fail(f"{field}.{name}", f"unknown price (expected {', '.join(_PRICE_FIELDS)})")
            figures[name] = self.parse_price(f"{field}.{name}", figure)
        for name in ("input", "output"):
            if figures.get(name) is None:
                raise self.fail(f"{field}.{name}", "missing (a price table needs at least input and output)")
        return Prices(**figures)

    def parse_price(self, field: str, value: Any) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, (int, Decimal, str)):
            raise self.fail(field, "must be a number (USD per million tokens)")
        try:
            price = Decimal(value)
        except ArithmeticError:
            price = Decimal("NaN")
        if not price.is_finite() or price < 0:
            raise self.fail(field, f"must be a non-negative number, not {value!r}")
        return price

    def parse_tiers(self, value: Any) -> tuple:
        if not isinstance(value, list):
            raise self.fail("tiers", "must be a list of {above_prompt_tokens = N, prices = {...}}")
        tiers = []
        for i, tier in enumerate(value):
            field = f"tiers[{i}]"
            if not isinstance(tier, dict) or set(tier) != {"above_prompt_tokens", "prices"}:
                raise self.fail(field, "must set exactly above_prompt_tokens and prices")
            above = tier["above_prompt_tokens"]
            if isinstance(above, bool) or not isinstance(above, int) or above < 0:
                raise self.fail(f"{field}.above_prompt_tokens", "must be a non-negative integer")
            if tiers and above <= tiers[-1].above_prompt_tokens:
                raise self.fail(f"{field}.above_prompt_tokens", "tiers must be in ascending order")
            tiers.append(PriceTier(above, self.parse_prices(f"{field}.prices", tier["prices"], None)))
        return tuple(tiers)


def _owner(models: Mapping[str, ModelInfo], name: str) -> Optional[ModelInfo]:
    if name in models:
        return models[name]
    return next((m for m in models.values() if name in m.aliases), None)


# ------------------------------------------------------------------------------------------ checking

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _refuses_sampling(api_version: str) -> bool:
    return bool(_DATE.match(api_version)) and api_version >= NO_SAMPLING_VERSION


def thinking_on(thinking: Any) -> bool:
    """Whether a `thinking` param asks the model to think (enabled or adaptive); see `thinks` for
    whether a model thinks when none is sent."""
    return isinstance(thinking, Mapping) and thinking.get("type") in ("enabled", "adaptive")


def thinks(model: ModelInfo, thinking: Any) -> bool:
    """Whether the model thinks with this `thinking` param: asked to (enabled or adaptive), or by default
    when none is sent (thinking_default "adaptive": the 5-family thinks unless told "disabled", and
    Opus 5.5 and Fable 5.1 cannot be told). Of what thinking refuses, a prefill is refused either way;
    the other checks hold for thinking asked for (see check_params)."""
    if thinking is None:
        return model.thinking_default == "adaptive"
    return thinking_on(thinking)


def check_params(model: Optional[ModelInfo], params: Mapping, api_version: str) -> list:
    """Problems the API would answer with a 400 (an `errored` batch result): one message per problem.

    A model the catalog does not know (None) is checked against the rules the API holds every model to:
    the API version's, and those of thinking when it is asked for (a budget below max_tokens; no prefill,
    forced tool, temperature other than 1, top_k or top_p below 0.95 while it thinks)."""
    name = model.id if model is not None else params.get("model")
    problems: list[str] = []

    for param in SAMPLING_PARAMS:
        if params.get(param) is None:
            continue
        if model is not None and not model.sampling:
            problems.append(f"{param} is not accepted by {name} (it takes no sampling parameters)")
        elif _refuses_sampling(api_version):   # the version's own rule: every model, known or not
            problems.append(f"{param} is not accepted by {name} under API version {api_version} "
                            f"(that version refuses sampling parameters on every model)")
    if model is None:
        thinking, max_tokens = params.get("thinking"), params.get("max_tokens")
        if thinking is not None:
            problems += _check_thinking(None, thinking, max_tokens if isinstance(max_tokens, int) else None, name)
        if thinking_on(thinking):
            problems += _check_with_thinking(None, params, name)
        return problems

    max_tokens = params.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        problems.append(f"max_tokens must be an integer for {name}, not {max_tokens!r}")
        max_tokens = None
    elif max_tokens < 1:
        problems.append(f"max_tokens {max_tokens} is not accepted by {name} (it must be at least 1)")
    elif model.max_output_tokens is not None and max_tokens > model.max_output_tokens:
        problems.append(f"max_tokens {max_tokens} is not accepted by {name} "
                        f"(its limit is {model.max_output_tokens})")

    thinking = params.get("thinking")
    if thinking is not None:
        problems += _check_thinking(model, thinking, max_tokens)

    tool_choice = params.get("tool_choice")
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") in ("tool", "any") and not model.forced_tool:
        hint = "; use output_config.format instead" if model.structured_output else ""
        problems.append(f"tool_choice type {tool_choice.get('type')!r} is not accepted by {name} "
                        f"(it refuses forced tool use{hint})")

    if thinking_on(thinking):
        problems += _check_with_thinking(model, params)
    elif thinks(model, thinking) and _prefilled(params):   # thinking by default refuses a prefill all the same
        why = ("it thinks by default and cannot turn thinking off" if "disabled" not in model.thinking else
               'it thinks by default: set thinking = "disabled" to use a prefill')
        problems.append(_PREFILL_WHILE_THINKING.format(name=model.id, why=why))

    output_config = params.get("output_config")
    if isinstance(output_config, Mapping):
        if output_config.get("format") is not None and not model.structured_output:
            problems.append(f"output_config.format is not accepted by {name} (it has no structured output; "
                            f"force a tool with the schema instead)")
        effort = output_config.get("effort")
        if effort is not None:
            if not model.effort:
                problems.append(f"output_config.effort is not accepted by {name} (it has no effort control)")
            elif effort not in EFFORT_LEVELS:
                problems.append(f"output_config.effort {effort!r} is not accepted by {name} "
                                f"(use one of {', '.join(EFFORT_LEVELS)})")
    return problems


_PREFILL_WHILE_THINKING = "a prefill (a final assistant message) is not accepted by {name} while it thinks ({why})"


def _prefilled(params: Mapping) -> bool:
    messages = params.get("messages")
    return (isinstance(messages, list) and bool(messages) and isinstance(messages[-1], Mapping)
            and messages[-1].get("role") == "assistant")


def _check_with_thinking(model: Optional[ModelInfo], params: Mapping, name: Optional[str] = None) -> list:
    """What the API refuses while the model thinks (the extended thinking docs: no forced tool use, no
    prefill, temperature only 1, no top_k, top_p only from 0.95 to 1), for any model (None: one the
    catalog lacks, named `name`)."""
    name = model.id if model is not None else name
    why = f"thinking is {params['thinking']['type']}"
    problems = []
    tool_choice = params.get("tool_choice")
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") in ("tool", "any") \
            and (model is None or model.forced_tool):
        problems.append(f"tool_choice type {tool_choice.get('type')!r} is not accepted by {name} while it thinks "
                        f"(thinking allows only tool_choice auto or none; {why})")
    if _prefilled(params):
        problems.append(_PREFILL_WHILE_THINKING.format(name=name, why=why))
    if model is None or model.sampling:   # (a model without sampling parameters refuses them anyway)
        temperature, top_p, top_k = params.get("temperature"), params.get("top_p"), params.get("top_k")
        if temperature is not None and temperature != 1:
            problems.append(f"temperature {temperature} is not accepted by {name} while it thinks (only 1; {why})")
        if top_k is not None:
            problems.append(f"top_k is not accepted by {name} while it thinks ({why})")
        if isinstance(top_p, (int, float)) and top_p < 0.95:
            problems.append(f"top_p {top_p} is not accepted by {name} while it thinks (only 0.95 to 1; {why})")
    return problems


def _check_thinking(model: Optional[ModelInfo], thinking: Any, max_tokens: Optional[int],
                    name: Optional[str] = None) -> list:
    """The `thinking` param itself: its type for this model (None: a model the catalog lacks, named
    `name`, whose accepted types are not known), and a budget_tokens the API takes."""
    name = model.id if model is not None else name
    if not isinstance(thinking, Mapping) or thinking.get("type") not in THINKING_TYPES:
        return [f"thinking must be {{\"type\": \"enabled\"|\"adaptive\"|\"disabled\"}} for {name}, not {thinking!r}"]
    kind = thinking["type"]
    if model is not None and not model.thinking:
        return [f"thinking is not accepted by {name} (it has no extended thinking)"]
    if model is not None and kind not in model.thinking:
        what = {"enabled": "manual budget_tokens", "adaptive": "adaptive thinking",
                "disabled": "turning thinking off"}[kind]
        return [f"thinking.type {kind!r} is not accepted by {name} ({what} is refused; it accepts "
                f"{', '.join(model.thinking)})"]
    budget = thinking.get("budget_tokens")
    if kind != "enabled":
        if budget is not None:
            return [f"thinking.budget_tokens is not accepted by {name} with thinking.type {kind!r} "
                    f"(only with 'enabled')"]
        return []
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < MIN_THINKING_BUDGET:
        return [f"thinking.budget_tokens must be an integer of at least {MIN_THINKING_BUDGET} for {name}, "
                f"not {budget!r}"]
    if max_tokens is not None and budget >= max_tokens:
        return [f"thinking.budget_tokens {budget} is not accepted by {name} "
                f"(it must be less than max_tokens {max_tokens})"]
    return []
