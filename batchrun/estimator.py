"""What a job will cost before it is paid for, and the budget that holds while it runs.

Token counts come from the API's count_tokens endpoint with the job's own model (tokenizers differ:
Claude 4.7+ and Haiku 5.5 count ~30% more for the same text). Small jobs are counted exactly; for
larger ones a seeded random sample is counted and the rest extrapolated from its tokens-per-character
ratio — the output says which. The maximum pads the extrapolated input tokens by MARGIN, as the
reservations made while running do (`request_max`): a budget of the maximum holds every row.

An endpoint that does not count tokens (a gateway without count_tokens, or whose upstream is down) is
tried once, without retries (the Anthropic API's transient errors are retried as any call's); then every request is approximated from its characters (`approx_tokens`),
said once: the estimate's input tokens at a typical characters-per-token rate of the model's tokenizer
family, its minimum at twice as many characters per token, its maximum at one token per UTF-8 byte of
the whole request (x1.3 for the newer tokenizer) plus APPROX_MEDIA_TOKENS per image or document. A
byte-level tokenizer never makes more tokens than bytes, so the maximum, and a budget of it, holds.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Callable, Optional

from .errors import ApiError, AuthError, InputError
from .requests import canonical_json as canonical, full_body
from .spec import PRIME_MIN_ROWS, prefix_cached, primes_cache
from .states import CANCELED, ERRORED, EXPIRED, IN_FLIGHT, INVALID_OUTPUT, PENDING, SUCCEEDED
from .store import JobFigures

log = logging.getLogger("batchrun")

EXACT_LIMIT = 200       # count every request up to this many
SAMPLE_SIZE = 60        # otherwise count this many, chosen at random (seeded)
MARGIN = Decimal("1.10")  # the maximum pads input tokens extrapolated (not counted) by this much
CENT_MILLIONTH = Decimal("0.00000001")   # the estimate's dollars are given to 8 decimals
# without count_tokens: characters per token of ordinary text, by tokenizer family (new_tokenizer in the
# catalog: Claude 4.7+ and Haiku 5.5 count ~30% more tokens for the same text)
CHARS_PER_TOKEN = {False: Decimal("4.0"), True: Decimal("3.1")}
APPROX_LOW = Decimal(2)               # the minimum assumes this many times the characters per token
APPROX_BYTE_TOKENS = {False: Decimal("1.0"), True: Decimal("1.3")}   # the maximum: tokens per UTF-8 byte
APPROX_MEDIA_TOKENS = 5000            # the maximum adds this per image or document block (its bytes aside)
APPROX_NOTE = "approximate: this endpoint does not count tokens"


@dataclass
class Estimate:
    requests: int
    input_tokens: int
    system_tokens: int
    cost_usd_min: Optional[float]
    cost_usd_max: Optional[float]
    method: str                     # "exact", "sampled" or "approximate" (the endpoint does not count tokens)
    sample_size: int
    done: int
    failed: int
    in_flight: int
    remaining: int
    spent_usd: Optional[float]
    max_tokens: int
    model: str
    batch: bool
    cache: Optional[str] = None     # how the cached prefix is expected to be paid (see Estimator.cache_plan)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Estimator:
    """The estimate of a job, and the most each request may cost, from what the store holds.

    Handed what it needs, not the runner: the job's spec, its model and the catalog that prices it,
    `count_tokens(params, retry) -> int` (the API's count, or an ApiError), `figures()` (Planner.figures:
    rows by state, first body, pending bodies, their sizes, and the bodies of rows asked for), `sample()`
    (the bodies of the job's first rows, for its tokens per character before any estimate counted them), `prefix()` (the
    shared part every stored body is spliced into; see requests.full_body) and whether the endpoint is
    the Anthropic API (`at_anthropic`: its count_tokens exists, so its transient errors are retried).
    It keeps what it counted (a run estimates again as it goes), never what the store holds.
    """

    def __init__(self, spec, catalog, model, *, count_tokens: Callable[[dict, bool], int],
                 figures: Callable[[], JobFigures], sample: Callable[[], list],
                 prefix: Callable[[], Optional[str]] = lambda: None, at_anthropic: bool = False):
        self.spec = spec
        self.catalog = catalog
        self.model = model
        self._count_tokens = count_tokens
        self._figures = figures
        self._sample = sample
        self._prefix = prefix
        self.at_anthropic = at_anthropic
        self._ratio: Optional[Decimal] = None
        self._system_tokens: Optional[tuple] = None
        self._counted: dict = {}      # a body's digest (not the body: it may hold an image) -> its tokens
        self._brackets: dict = {}
        # count_tokens: None until a count succeeds (tried once, without retries); False when the endpoint
        # does not count tokens and every request is approximated from its characters
        self.counts_tokens: Optional[bool] = None
        self.note: Optional[str] = None

    def _full(self, body: str) -> dict:
        """The full params of a stored row body (its shared part spliced in)."""
        return json.loads(full_body(self._prefix(), body))

    def _chars(self, body: str) -> int:
        """Characters of a request: its row part and its shared part."""
        return len(body) + len(self._prefix() or "")

    # ---- counting --------------------------------------------------------------------------------
    @property
    def approximate(self) -> bool:
        return self.counts_tokens is False

    def _api_count(self, params: dict) -> Optional[int]:
        """count_tokens, or None once the endpoint has shown it does not count tokens (said once)."""
        if self.approximate:
            return None
        at_anthropic = self.at_anthropic   # has count_tokens: its transient errors retried
        try:
            n = self._count_tokens(params, bool(self.counts_tokens) or at_anthropic)
        except AuthError:
            raise
        except ApiError as exc:
            status = exc.status
            # a 4xx from the Anthropic API is about the request (a 404: its model); from a gateway, a 404
            # or 405 means it has no count_tokens. 5xx, timeouts and replies without a count: none here
            if status is not None and 400 <= status < 500 and status != 429 and (at_anthropic or status not in (404, 405)):
                raise
            self.counts_tokens = False
            self.note = APPROX_NOTE
            log.warning("%s (%s); token counts are approximated from characters (see README: Estimate without "
                        "count_tokens)", APPROX_NOTE, exc)
            return None
        self.counts_tokens = True
        return n

    def _count(self, body: str) -> Optional[int]:
        """Tokens of a stored request, counted by the API once per body (a run estimates again as it goes);
        None when the endpoint does not count tokens."""
        known, key = self._counted, _digest(body)
        if key not in known:
            n = self._api_count(self._full(body))
            if n is None:
                return None
            if len(known) >= 20_000:
                known.clear()
            known[key] = n
        return known[key]

    def approx_tokens(self, body: str) -> tuple[int, int, int]:
        """(expected, minimum, maximum) input tokens of a stored request, from its characters (see the
        module's docstring), for an endpoint that does not count tokens."""
        return self._approx(self._full(body))

    def _approx(self, params: dict) -> tuple[int, int, int]:
        new = bool(self.model and self.model.new_tokenizer)
        chars, media = _text_chars(params.get("system")) + _text_chars(params.get("messages")), _media(params)
        expected = int((Decimal(chars) / CHARS_PER_TOKEN[new]).to_integral_value(ROUND_CEILING)) + 1000 * media
        low = int((Decimal(chars) / (CHARS_PER_TOKEN[new] * APPROX_LOW)).to_integral_value(ROUND_FLOOR))
        size = len(canonical(params).encode("utf-8"))
        high = int((Decimal(size) * APPROX_BYTE_TOKENS[new]).to_integral_value(ROUND_CEILING)) + APPROX_MEDIA_TOKENS * media
        return min(expected, high), low, high

    def uncounted_tokens(self, chars: int) -> int:
        """The most input tokens a request of `chars` characters (row part and shared part) that was not
        counted is taken to have: its characters at the counted ones' tokens per character, padded by MARGIN."""
        return int((Decimal(chars) * self.ratio() * MARGIN).to_integral_value(ROUND_CEILING))

    def max_tokens(self, body: str) -> int:
        """max_tokens of a stored request: the job's, or the row's own (max_tokens_column)."""
        return json.loads(body)["max_tokens"] if self.spec.max_tokens_column else self.spec.max_tokens

    def system_tokens(self, body: str, which: int = 0) -> int:
        """Tokens of the part that can be cached, from a stored request: the system prompt, and with
        cache_system the few-shot turns after it. Counted: one figure; approximated: `which` picks the
        expected (0), minimum (1) or maximum (2) figure."""
        if self._system_tokens is None:
            params = self._full(body)
            shots = params["messages"][:2 * len(self.spec.few_shot or ())] if self.spec.cache_system else []
            if not params.get("system") and not shots:
                self._system_tokens = (0, 0, 0)
            else:
                probe = {"model": params["model"], "messages": [{"role": "user", "content": "x"}]}
                full = {**probe, "messages": shots + probe["messages"]}
                if params.get("system"):
                    full["system"] = params["system"]
                without = self._api_count(probe)
                with_prefix = None if without is None else self._api_count(full)
                if with_prefix is None:
                    alone = {"model": params["model"], "messages": shots}
                    if params.get("system"):
                        alone["system"] = params["system"]
                    self._system_tokens = self._approx(alone)
                else:
                    self._system_tokens = (max(0, with_prefix - without),) * 3
        return self._system_tokens[which]

    def ratio(self) -> Decimal:
        """Tokens per character of request body, from a sample of this job's requests."""
        if self._ratio is None:
            rows = self._sample()
            sample = random.Random(0).sample(rows, min(len(rows), 20))
            counts = [self._count(b) for b in sample]
            if None in counts:    # not counted: approx_tokens serves instead; this ratio is never used
                return Decimal(1) / CHARS_PER_TOKEN[False]
            chars = sum(len(full_body(self._prefix(), b)) for b in sample)
            self._ratio = Decimal(sum(counts)) / Decimal(max(chars, 1))
        return self._ratio

    # ---- pricing ---------------------------------------------------------------------------------
    def _cost(self, usage: dict) -> Optional[Decimal]:
        return self.catalog.cost(self.spec.model, usage, batch=self.spec.mode == "batch",
                                 cache_ttl=self.spec.cache_ttl)

    def bracket(self, input_tokens: int, system_tokens: int, max_tokens: int, cacheable: Optional[bool]
                ) -> tuple[Optional[Decimal], Optional[Decimal]]:
        """(min, max) cost of one request. `cacheable` (see `cacheable`): True or None (it may be cached),
        its cached prefix read (the minimum) or written (the maximum); False, every input token at the
        input price."""
        key = (input_tokens, system_tokens, max_tokens, cacheable)
        known = self._brackets.get(key)
        if known is None:    # rows share a few hundred token counts: each is priced once
            cached = system_tokens if cacheable is not False else 0
            rest = max(input_tokens - cached, 0)
            low = self._cost({"input_tokens": rest, "output_tokens": 0, "cache_read_input_tokens": cached})
            high = self._cost({"input_tokens": rest, "output_tokens": max_tokens,
                               "cache_creation_input_tokens": cached})
            known = self._brackets[key] = (low, high)
            if len(self._brackets) > 100_000:
                self._brackets.clear()
        return known

    def cacheable(self, system_tokens: int) -> Optional[bool]:
        """Whether the cached prefix (`system_tokens` of it) is cached: spec.prefix_cached for the job's
        model; False without cache_system. None, the model's minimum is not known: the API may write the
        cache or not, so the bracket spans both (its minimum reads the prefix, with no write counted; its
        maximum, which a budget must hold, writes it for every request), and no primer waits for it."""
        if not self.spec.cache_system:
            return False
        return prefix_cached(system_tokens, self.model)

    # ---- the estimate ----------------------------------------------------------------------------
    def estimate(self, spent_usd: Optional[float] = None) -> Estimate:
        """The estimate of what is still to be paid: the rows still to send (the store's figures), priced
        (`spent_usd`: what the job has spent, shown with it)."""
        spec = self.spec
        figures = self._figures()
        counts, pending, first = figures.counts, figures.pending, figures.first
        bodies_n = counts.get(PENDING, 0)
        sys_tokens = self.system_tokens(first) if first else 0
        if first and self.counts_tokens is None:   # one try at counting tokens before the rows are priced
            self._count(first)
        cacheable = self.cacheable(sys_tokens)
        low = high = Decimal(0)
        unknown = False
        total_tokens = 0

        def add(lo: Optional[Decimal], hi: Optional[Decimal]) -> None:
            """One row's bracket into the job's (a row that cannot be priced makes the job's unknown)."""
            nonlocal low, high, unknown
            if lo is None or hi is None:
                unknown = True
            else:
                low, high = low + lo, high + hi

        if self.approximate:
            method, sample_n = "approximate", 0
            sys_low, sys_high = (self.system_tokens(first, 1), self.system_tokens(first, 2)) \
                if first else (0, 0)
            for body in pending:
                tokens, least, most = self.approx_tokens(body)
                total_tokens += tokens
                mt = self.max_tokens(body)
                add(self.bracket(least, sys_low, mt, cacheable)[0], self.bracket(most, sys_high, mt, cacheable)[1])
        elif bodies_n <= EXACT_LIMIT:
            method, sample_n = "exact", bodies_n
            chars = 0
            for body in pending:
                tokens = self._count(body)
                if tokens is None:    # the endpoint stopped counting: every row approximated instead
                    return self.estimate(spent_usd)
                total_tokens += tokens
                chars += self._chars(body)
                add(*self.bracket(tokens, sys_tokens, self.max_tokens(body), cacheable))
            if chars:
                self._ratio = Decimal(total_tokens) / Decimal(chars)
        else:
            method = "sampled"
            lengths, max_tokens, picked = [], [], []
            rnd, shared = random.Random(0), len(self._prefix() or "")
            # each row's figures (its body is not read); a reservoir sample of rows, one pass, bounded memory,
            # whose bodies alone are read (rendered again from the input: see bodies.py)
            for i, (row, chars, mt) in enumerate(figures.sizes):
                lengths.append(chars + shared)   # (as _chars of its body)
                max_tokens.append(mt if spec.max_tokens_column and mt is not None else spec.max_tokens)
                if len(picked) < SAMPLE_SIZE:
                    picked.append((i, row))
                else:
                    j = rnd.randint(0, i)
                    if j < SAMPLE_SIZE:
                        picked[j] = (i, row)
            got = figures.bodies_of([row for _, row in picked])
            bodies = [(i, got[row]) for i, row in picked]
            sample_n = len(bodies)
            counted = {i: self._count(b) for i, b in bodies}
            if None in counted.values():
                return self.estimate(spent_usd)
            chars = sum(self._chars(b) for _, b in bodies)
            ratio = self._ratio = Decimal(sum(counted.values())) / Decimal(chars)
            for i, (length, mt) in enumerate(zip(lengths, max_tokens)):
                tokens = most = counted.get(i)
                if tokens is None:   # the input tokens expected; the maximum pads them, as a reservation does
                    tokens = int((Decimal(length) * ratio).to_integral_value())
                    most = self.uncounted_tokens(length)
                total_tokens += tokens
                add(self.bracket(tokens, sys_tokens, mt, cacheable)[0],
                    self.bracket(most, sys_tokens, mt, cacheable)[1])
        if cacheable is True and bodies_n and not unknown:
            # one request writes the cache: the minimum pays that write, not a read
            first_write = self._cost({"cache_creation_input_tokens": sys_tokens})
            first_read = self._cost({"cache_read_input_tokens": sys_tokens})
            if first_write is not None and first_read is not None:
                low += first_write - first_read
        failed = sum(n for s, n in counts.items() if s in (ERRORED, EXPIRED, CANCELED, INVALID_OUTPUT))
        return Estimate(
            requests=bodies_n, input_tokens=total_tokens, system_tokens=sys_tokens,
            # rounded outwards: a budget of the maximum shown covers every request of it
            cost_usd_min=None if unknown else float(low.quantize(CENT_MILLIONTH, rounding=ROUND_FLOOR)),
            cost_usd_max=None if unknown else float(high.quantize(CENT_MILLIONTH, rounding=ROUND_CEILING)),
            method=method, sample_size=sample_n, done=counts.get(SUCCEEDED, 0), failed=failed,
            in_flight=counts.get(IN_FLIGHT, 0), remaining=bodies_n, spent_usd=spent_usd,
            max_tokens=spec.max_tokens, model=spec.model, batch=spec.mode == "batch",
            cache=self.cache_plan(bodies_n, cacheable) if cacheable is not False else None)

    def cache_plan(self, requests: int, cacheable: Optional[bool] = True) -> str:
        """The plan the bracket's minimum prices: one write, then reads. In batch mode, that is what
        priming does (spec.primes_cache); without it a cold batch may write once per row. A model whose
        minimum cacheable prompt is not known: not primed, every request reading the cache (minimum) or
        writing it (maximum)."""
        if cacheable is None:
            return (f"the minimum cacheable prompt of {self.spec.model} is not known, so the cache may not be "
                    "written (not primed): every request reads it (minimum) or writes it (maximum)")
        if self.spec.mode != "batch":
            return "one request writes the cache, the others read it (minimum); every one writes it (maximum)"
        if primes_cache(self.spec, self.model) and requests >= PRIME_MIN_ROWS:
            return ("primed: 1 request is sent alone first and writes the cache, the others read it once it "
                    "has ended (minimum); every one writes it (maximum)")
        if not self.spec.cache_prime:
            return ("not primed (cache_prime = false): a cold batch may write the cache once per row, up to "
                    "the maximum")
        return "one request writes the cache, the others read it (minimum); every one writes it (maximum)"

    # ---- the budget while running -------------------------------------------------------------------
    def request_max(self, body: str) -> Decimal:
        """The most one request (its stored row body) may cost, which its batch reserves before it is sent.

        Its input tokens as an estimate of this run counted them, or else extrapolated from the latest
        estimate's tokens per character and padded by MARGIN (`uncounted_tokens`): the same figure as
        the estimate's maximum, so a budget of that maximum reserves every row of it. Its full
        max_tokens of output; cache writes where the system prompt is cached.
        """
        tokens = self._counted.get(_digest(body))
        if tokens is None and not self.approximate:
            tokens = self.uncounted_tokens(self._chars(body))   # may find it cannot count
        sys_tokens = self.system_tokens(body)
        if self.approximate:   # the estimate's own maximum for this row (see `estimate`)
            tokens = self.approx_tokens(body)[2]
            cacheable = self.cacheable(sys_tokens)
            sys_tokens = self.system_tokens(body, 2)
        else:
            cacheable = self.cacheable(sys_tokens)
        lo, hi = self.bracket(tokens, sys_tokens, self.max_tokens(body), cacheable)
        if hi is None:
            raise InputError(f"max_cost: {self.spec.model} has no prices in the model catalog, so a budget "
                             "cannot be enforced; add its prices with --models FILE")
        return hi


def _text_chars(value) -> int:
    """Characters of the text a model reads in `system` or `messages` (text blocks and strings; not
    images, documents' data or the JSON around them)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_chars(v) for v in value)
    if isinstance(value, dict):
        if value.get("type") in ("image", "document"):
            return 0
        return sum(_text_chars(value.get(k)) for k in ("text", "content"))
    return 0


def _media(params: dict) -> int:
    """Image and document blocks of a request."""
    n = 0
    for message in params.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            n += sum(1 for block in content if isinstance(block, dict) and block.get("type") in ("image", "document"))
    return n


def _digest(body: str) -> bytes:
    return hashlib.blake2b(body.encode("utf-8"), digest_size=16).digest()
