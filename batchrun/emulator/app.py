"""The emulator: a plain ASGI app that speaks the Message Batches and Messages API.

State lives in memory behind one lock (the app may be driven by uvicorn's loop and by the in-process
transport's loop at once). A batch's outcome is decided lazily, the first time it is looked at after
its processing time; its results file is generated line by line when downloaded.
"""
from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Optional
from urllib.parse import parse_qs

import anyio
import httpx

from . import replies
from .config import ERROR_TYPES, EmulatorConfig, EmulatorStats
from .validation import Invalid, check_batch_request, check_message_params, semantic_problem

log = logging.getLogger("batchrun.emulator")

FAULT_KINDS = ("429", "500", "529", "drop")
EXPIRY_SECONDS = 24 * 3600
RESULTS_KEPT_SECONDS = 29 * 24 * 3600
DEFAULT_LIMITS = {"requests": 4000, "input": 2_000_000, "output": 400_000}
BUCKETS = {"requests": "requests", "input": "input tokens", "output": "output tokens"}
_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

# outcome codes of one request of an ended batch
SUCCEEDED, ERR_OVERLOADED, ERR_API, ERR_INVALID, ERR_NOT_FOUND, EXPIRED, CANCELED = range(7)
_TRANSIENT = {ERR_OVERLOADED: ("overloaded_error", "Overloaded"),
              ERR_API: ("api_error", "Internal server error")}
_ERROR_CODES = {"overloaded_error": ERR_OVERLOADED, "api_error": ERR_API}


class DroppedConnection(httpx.RemoteProtocolError):
    """Raised by the app to drop the connection mid-reply.

    Over uvicorn the server closes the socket (the client sees httpx.RemoteProtocolError); in
    process (httpx.ASGITransport, `Emulator.sync_transport()`) the exception itself reaches the client.
    """

    def __init__(self, message: str = "the emulator dropped the connection (injected fault)"):
        super().__init__(message)


class _DropFilter(logging.Filter):
    """Keeps uvicorn from logging a traceback for every injected dropped connection."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, DroppedConnection)


def install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropFilter) for f in logger.filters):
        logger.addFilter(_DropFilter())


BATCH_ROUTES = ("create", "list", "retrieve", "cancel", "delete", "results")


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fmt_seconds(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds == int(seconds):
        return str(int(seconds))
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def _go_duration(seconds: float) -> str:
    """A duration as OpenAI-style reset headers give it: "250ms", "1.5s", "6m0s", "1m30.5s"."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{int(seconds * 1000 + 0.999)}ms"
    minutes, rest = divmod(seconds, 60)
    rest = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{rest}s" if minutes else f"{rest}s"


def _retry_headers(seconds: float) -> list:
    return [("retry-after", _fmt_seconds(seconds)), ("retry-after-ms", str(max(0, int(seconds * 1000 + 0.999))))]


def params_hash(params: Any) -> str:
    return hashlib.sha256(replies.canonical(params).encode("utf-8")).hexdigest()[:16]


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: list = field(default_factory=list)
    stream: Optional[Iterator[Any]] = None      # chunks (bytes), or _DROP to drop the connection there
    drop_after: Optional[int] = None            # send this many bytes of `body`, then drop the connection
    content_type: str = "application/json"


_DROP = object()
_JSON_STRING = json.JSONEncoder(ensure_ascii=False).encode


def json_reply(status: int, obj: Any, headers: Optional[list] = None) -> Reply:
    return Reply(status, json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
                 list(headers or []))


@dataclass
class Request:
    method: str
    path: str            # without the gateway prefix
    prefix: str          # what came before /v1/ (a gateway's base path), "" normally
    query: dict
    headers: dict
    body: bytes
    scheme: str
    host: str
    request_id: str

    def error(self, status: int, error_type: str, message: str, headers: Optional[list] = None) -> Reply:
        return json_reply(status, {"type": "error", "error": {"type": error_type, "message": message},
                                   "request_id": self.request_id}, headers)

    def json(self) -> Any:
        return json.loads(self.body)


class _Batch:
    __slots__ = ("id", "created", "requests", "hashes", "api_version", "seed", "cancel_at", "ended_at",
                 "archived_at", "outcomes", "errors", "cache", "counts", "deleted")

    def __init__(self, batch_id: str, created: float, requests: list, hashes: list, api_version: str, seed: int):
        self.id = batch_id
        self.hashes = hashes              # params_hash of each request
        self.created = created
        self.requests = requests          # [(custom_id, params)] in submission (= processing) order
        self.api_version = api_version
        self.seed = seed
        self.cancel_at: Optional[float] = None
        self.ended_at: Optional[float] = None
        self.archived_at: Optional[float] = None
        self.outcomes: Optional[bytearray] = None
        self.errors: dict = {}            # index -> (error type, message) for final errors
        self.cache: dict = {}             # index -> ("write" | "read", tokens, ttl)
        self.counts: Optional[dict] = None
        self.deleted = False


class Emulator:
    """The API emulator, an ASGI app. See the package docstring for the knobs and endpoints."""

    def __init__(self, config: Optional[EmulatorConfig] = None, *, clock: Callable[[], float] = time.time):
        self.config = config if config is not None else EmulatorConfig()
        self.clock = clock
        self.base_url: Optional[str] = None
        self._lock = threading.RLock()
        self._ids = random.Random(f"emulator-ids:{self.config.seed}:{time.time_ns()}")
        self._loop_runner = None
        self.reset()

    # ------------------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget all batches, caches, rate-limit use and stats (the buckets start full)."""
        with self._lock:
            self.stats = EmulatorStats()
            self._batches: dict = {}       # id -> _Batch (live ones)
            self._order: list = []         # every batch id ever created, oldest first
            self._seq: dict = {}           # id -> position in _order (deleted ones too, for pagination)
            self._cache: dict = {}         # cache key -> expiry time
            self._cache_since: dict = {}   # cache key -> when its entry became readable (cold_batches)
            self._spent = dict.fromkeys(BUCKETS, 0.0)   # how far each rate-limit bucket is below full
            self._refilled_at = self.clock()
            self._rng_seed = self.config.seed
            self._rng = random.Random(self._rng_seed)
            self._fault_turn = 0

    def _random(self) -> random.Random:
        if self.config.seed != self._rng_seed:
            self._rng_seed = self.config.seed
            self._rng = random.Random(self._rng_seed)
            self._fault_turn = 0   # (a seed gives the same faults, their kinds in the same turn)
        return self._rng

    def _new_id(self, prefix: str) -> str:
        return prefix + "".join(self._ids.choice(_ALNUM) for _ in range(24))

    def batch_ids(self) -> list:
        """Ids of the live batches, newest first."""
        with self._lock:
            return [i for i in reversed(self._order) if i in self._batches]

    def sync_transport(self) -> httpx.BaseTransport:
        """An httpx sync transport that runs this app in process (on a private event loop)."""
        from .transport import SyncASGITransport
        return SyncASGITransport(self)

    # ------------------------------------------------------------------------------ ASGI
    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        req = self._request(scope, b"".join(chunks))
        replies.CHAR_TOKENS.set(self.config.lean)   # this request's task only
        try:
            reply = await self._handle(req)
        except DroppedConnection:
            raise
        except Exception as exc:  # a bug: answer like the API would, and log it
            log.exception("emulator: error handling %s %s", req.method, req.path)
            reply = req.error(500, "api_error", f"emulator internal error: {type(exc).__name__}: {exc}")
        await self._send(send, req, reply)

    def _request(self, scope, body: bytes) -> Request:
        headers: dict = {}
        for raw_key, raw_value in scope.get("headers", []):
            headers[raw_key.decode("latin-1").lower()] = raw_value.decode("latin-1")
        path = scope.get("path", "/")
        prefix = ""
        if not path.startswith("/v1/") and not path.startswith("/_emulator/"):
            at = path.find("/v1/")
            if at > 0:
                prefix, path = path[:at], path[at:]
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
        host = headers.get("host")
        if not host:
            server = scope.get("server") or ("localhost", None)
            host = f"{server[0]}:{server[1]}" if server[1] else str(server[0])
        with self._lock:
            request_id = self._new_id("req_")
        return Request(scope.get("method", "GET").upper(), path.rstrip("/") or "/", prefix, query, headers, body,
                       scope.get("scheme", "http"), host, request_id)

    async def _send(self, send, req: Request, reply: Reply) -> None:
        headers = [(b"content-type", reply.content_type.encode()), (b"request-id", req.request_id.encode()),
                   (b"date", email.utils.formatdate(self.clock(), usegmt=True).encode())]   # the API's clock
        headers += [(k.encode("latin-1"), str(v).encode("latin-1")) for k, v in reply.headers]
        if reply.stream is None:
            headers.append((b"content-length", str(len(reply.body)).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        if reply.drop_after is not None:
            await send({"type": "http.response.body", "body": reply.body[:reply.drop_after], "more_body": True})
            raise DroppedConnection()
        with self._lock:
            self.stats.status_counts[reply.status] += 1
        if reply.stream is None:
            await send({"type": "http.response.body", "body": reply.body, "more_body": False})
            return
        for chunk in reply.stream:
            if chunk is _DROP:
                raise DroppedConnection("the emulator dropped the results download (injected fault)")
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await anyio.sleep(0)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    # ------------------------------------------------------------------------------ routing
    async def _handle(self, req: Request) -> Reply:
        if req.path.startswith("/_emulator/"):
            return self._control(req)
        route = self._route(req)
        if isinstance(route, Reply):
            return route
        name, batch_id = route
        if name == "count_tokens" and (self.config.no_count_tokens or self.config.count_tokens_fails):
            with self._lock:
                self.stats.count_tokens_calls += 1
            if self.config.count_tokens_fails:
                return req.error(500, "api_error", "CountTokens processing error: cannot connect to the upstream")
        if self.config.no_batches and name in BATCH_ROUTES and self.config.no_batches_only in ("", name):
            how = self.config.no_batches_reply
            if how == "html":
                return Reply(404, b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>",
                             content_type="text/html")
            if how == "405":
                return Reply(405, b"Method Not Allowed", content_type="text/plain")
            return json_reply(404, {"detail": "Not Found"})   # a gateway that serves only some of the API
        if self.config.no_count_tokens and name == "count_tokens":
            return json_reply(404, {"detail": "Not Found"})
        with self._lock:
            self.stats.api_versions[req.headers.get("anthropic-version")] += 1
            self.stats.prefixes[req.prefix] += 1
        cfg = self.config
        if cfg.api_key is not None:
            key = req.headers.get("x-api-key")
            auth = req.headers.get("authorization", "")
            if key is None and auth.lower().startswith("bearer "):
                key = auth[7:].strip()
            if key != cfg.api_key:
                return req.error(401, "authentication_error", "invalid x-api-key")
        if not req.headers.get("anthropic-version"):
            return req.error(400, "invalid_request_error", "anthropic-version: header is required")
        injected = self._injected_error(req)
        if injected is not None:
            return injected
        if name == "create":
            with self._lock:
                self.stats.create_calls += 1
            if cfg.create_delay and cfg.create_delay > 0:   # the batch exists only once this is over
                await anyio.sleep(cfg.create_delay)
            return self._create(req)
        if name == "messages":
            with self._lock:
                self.stats.messages_calls += 1
        if name == "count_tokens":
            with self._lock:
                self.stats.count_tokens_calls += 1
        fault = self._pick_fault()
        if fault is not None:
            return self._fault_reply(req, fault)
        if name == "list":
            return self._list(req)
        if name == "retrieve":
            return self._retrieve(req, batch_id)
        if name == "cancel":
            return self._cancel(req, batch_id)
        if name == "delete":
            return self._delete(req, batch_id)
        if name == "results":
            return self._results(req, batch_id)
        if name == "messages":
            return await self._messages(req)
        if name == "count_tokens":
            return self._count_tokens(req)
        raise AssertionError(name)  # pragma: no cover

    def _route(self, req: Request):
        parts = req.path.strip("/").split("/")
        method = req.method
        allowed: tuple = ()
        if parts[:2] == ["v1", "messages"]:
            rest = parts[2:]
            if rest == []:
                allowed = ("POST",)
                if method == "POST":
                    return "messages", None
            elif rest == ["count_tokens"]:
                allowed = ("POST",)
                if method == "POST":
                    return "count_tokens", None
            elif rest == ["batches"]:
                allowed = ("GET", "POST")
                if method in allowed:
                    return ("create" if method == "POST" else "list"), None
            elif len(rest) == 2 and rest[0] == "batches":
                allowed = ("GET", "DELETE")
                if method in allowed:
                    return ("retrieve" if method == "GET" else "delete"), rest[1]
            elif len(rest) == 3 and rest[0] == "batches" and rest[2] in ("cancel", "results"):
                allowed = ("POST",) if rest[2] == "cancel" else ("GET",)
                if method in allowed:
                    return rest[2], rest[1]
        if allowed:
            return req.error(405, "invalid_request_error", f"method {method} is not allowed on {req.path}")
        return req.error(404, "not_found_error", f"not found: {req.method} {req.path}")

    # ------------------------------------------------------------------------------ faults
    def _injected_error(self, req: Request) -> Optional[Reply]:
        """A gateway's own error (error_status / error_type), for every call or the next error_calls."""
        cfg = self.config
        if cfg.error_status is None:
            return None
        with self._lock:
            if cfg.error_calls is not None:
                if cfg.error_calls <= 0:
                    return None
                cfg.error_calls -= 1
            self.stats.faults[f"error_{cfg.error_status}"] += 1
        headers = _retry_headers(cfg.retry_after) if cfg.error_status in (429, 529) else []
        return req.error(cfg.error_status, cfg.error_type, ERROR_TYPES.get(cfg.error_type, "error (injected)"), headers)

    def _pick_fault(self) -> Optional[str]:
        rate = self.config.fault_rate
        if not rate or rate <= 0:
            return None
        with self._lock:
            if self._random().random() < rate:
                # (whether a call fails is random; the kinds come in turn, so that a few faults cover all)
                self._fault_turn += 1
                return FAULT_KINDS[(self._fault_turn - 1) % len(FAULT_KINDS)]
        return None

    def _fault_reply(self, req: Request, kind: str) -> Reply:
        with self._lock:
            self.stats.faults[kind] += 1
        if kind == "429":
            return req.error(429, "rate_limit_error", "Number of requests has exceeded your rate limit "
                             "(injected fault)", _retry_headers(self.config.retry_after))
        if kind == "500":
            return req.error(500, "api_error", "Internal server error (injected fault)")
        if kind == "529":
            return req.error(529, "overloaded_error", "Overloaded (injected fault)")
        body = json.dumps({"type": "error", "error": {"type": "api_error", "message": "x" * 200}}).encode()
        return Reply(200, body, drop_after=len(body) // 3)

    # ------------------------------------------------------------------------------ batches
    def _create(self, req: Request) -> Reply:
        fault = self._pick_fault()
        if fault in ("429", "529"):          # these never create
            return self._fault_reply(req, fault)
        reply, batch = self._create_batch(req)
        if fault is not None:                 # 500 / drop: after the batch was created (ambiguous)
            if fault == "drop" and batch is not None:
                with self._lock:
                    self.stats.faults["drop"] += 1
                reply.drop_after = max(1, len(reply.body) // 2)
                return reply
            return self._fault_reply(req, fault)
        if batch is not None:
            with self._lock:
                drop = self.config.drop_after_create > 0
                if drop:
                    self.config.drop_after_create -= 1
                    self.stats.faults["drop_after_create"] += 1
            if drop:
                reply.drop_after = max(1, len(reply.body) // 2)
        return reply

    def _create_batch(self, req: Request) -> tuple:
        cfg = self.config
        if len(req.body) > cfg.max_body_bytes:
            return req.error(413, "request_too_large", f"Request exceeds the maximum allowed number of bytes "
                             f"({len(req.body)} > {cfg.max_body_bytes})"), None
        try:
            body = req.json()
        except (ValueError, UnicodeDecodeError) as exc:
            return req.error(400, "invalid_request_error", f"The request body is not valid JSON: {exc}"), None
        if not isinstance(body, dict):
            return req.error(400, "invalid_request_error", "The request body must be a JSON object"), None
        if cfg.validate:
            for key in body:
                if key != "requests":
                    return req.error(400, "invalid_request_error", f"{key}: Extra inputs are not permitted"), None
        requests = body.get("requests")
        if "requests" not in body:
            return req.error(400, "invalid_request_error", "requests: Field required"), None
        if not isinstance(requests, list):
            return req.error(400, "invalid_request_error", "requests: Input should be a valid list"), None
        if not requests:
            return req.error(400, "invalid_request_error", "requests: at least one request is required"), None
        if len(requests) > cfg.max_requests:
            return req.error(413, "request_too_large", f"requests: a batch holds at most {cfg.max_requests} "
                             f"requests (got {len(requests)})"), None
        seen: dict = {}
        try:
            items = [check_batch_request(item, i, seen, cfg.validate) for i, item in enumerate(requests)]
        except Invalid as exc:
            return req.error(400, "invalid_request_error", str(exc)), None
        # (lean: no hashes, so no counters of them)
        hashes = [params_hash(params) for _, params in items] if not cfg.lean else [""] * len(items)
        api_version = req.headers.get("anthropic-version", "2023-06-01")
        with self._lock:
            now = self.clock()
            if cfg.max_queued_requests is not None:   # the organisation's batch queue is full: not created
                queued = 0
                for other in self._batches.values():
                    self._advance(other, now)
                    queued += len(other.requests) if other.ended_at is None else 0
                if queued + len(items) > cfg.max_queued_requests:
                    return req.error(429, "rate_limit_error", f"Number of batch requests waiting in the queue "
                                     f"would exceed your limit ({queued} + {len(items)} > "
                                     f"{cfg.max_queued_requests})", _retry_headers(cfg.retry_after)), None
            batch = _Batch(self._new_id("msgbatch_"), now, items, hashes, api_version,
                           self._random().getrandbits(64))
            self._batches[batch.id] = batch
            self._seq[batch.id] = len(self._order)
            self._order.append(batch.id)
            stats = self.stats
            stats.batches_created += 1
            stats.requests_created += len(items)
            stats.submitted_custom_ids.update(cid for cid, _ in items)
            if not cfg.lean:
                stats.params_submitted.update(hashes)
            stats.accepted[batch.id] = [(cid, h) for (cid, _), h in zip(items, hashes)]
            return json_reply(200, self._batch_json(batch, req, advance=False)), batch

    def _get(self, req: Request, batch_id: str):
        batch = self._batches.get(batch_id)
        if batch is None:
            return req.error(404, "not_found_error", f"message batch {batch_id!r} not found")
        return batch

    def _retrieve(self, req: Request, batch_id: str) -> Reply:
        with self._lock:
            batch = self._get(req, batch_id)
            if isinstance(batch, Reply):
                return batch
            return json_reply(200, self._batch_json(batch, req))

    def _list(self, req: Request) -> Reply:
        raw_limit = req.query.get("limit", "20")
        try:
            limit = int(raw_limit)
        except ValueError:
            limit = -1
        if not 1 <= limit <= 1000:
            return req.error(400, "invalid_request_error", f"limit: Input should be an integer from 1 to 1000 "
                             f"(got {raw_limit!r})")
        after_id, before_id = req.query.get("after_id"), req.query.get("before_id")
        if after_id and before_id:
            return req.error(400, "invalid_request_error", "after_id and before_id cannot be used together")
        with self._lock:
            cursor = after_id or before_id
            if cursor and cursor not in self._seq:
                which = "after_id" if after_id else "before_id"
                return req.error(400, "invalid_request_error", f"{which}: unknown message batch {cursor!r}")
            order = self._order
            found: list = []
            has_more = False
            if before_id:  # newer than the cursor, the `limit` closest to it
                positions = range(self._seq[before_id] + 1, len(order))
            else:          # older than the cursor (or from the newest)
                start = self._seq[after_id] - 1 if after_id else len(order) - 1
                positions = range(start, -1, -1)
            for pos in positions:
                batch = self._batches.get(order[pos])
                if batch is None:
                    continue
                if len(found) == limit:
                    has_more = True
                    break
                found.append(batch)
            if before_id:
                found.reverse()
            data = [self._batch_json(b, req) for b in found]
        return json_reply(200, {"data": data, "has_more": has_more,
                                "first_id": data[0]["id"] if data else None,
                                "last_id": data[-1]["id"] if data else None})

    def _cancel(self, req: Request, batch_id: str) -> Reply:
        with self._lock:
            batch = self._get(req, batch_id)
            if isinstance(batch, Reply):
                return batch
            now = self.clock()
            self._advance(batch, now)
            if batch.ended_at is None and batch.cancel_at is None:
                batch.cancel_at = now
            return json_reply(200, self._batch_json(batch, req, advance=False))

    def _delete(self, req: Request, batch_id: str) -> Reply:
        with self._lock:
            batch = self._get(req, batch_id)
            if isinstance(batch, Reply):
                return batch
            self._advance(batch, self.clock())
            if batch.ended_at is None:
                return req.error(400, "invalid_request_error", f"message batch {batch_id} is still processing: "
                                 "only ended batches can be deleted (cancel it first)")
            batch.deleted = True
            del self._batches[batch_id]
        return json_reply(200, {"id": batch_id, "type": "message_batch_deleted"})

    def _results(self, req: Request, batch_id: str) -> Reply:
        with self._lock:
            batch = self._get(req, batch_id)
            if isinstance(batch, Reply):
                return batch
            now = self.clock()
            self._advance(batch, now)
            if batch.ended_at is None:
                return req.error(400, "invalid_request_error", f"message batch {batch_id} is still processing: "
                                 "results are available once it has ended")
            self._archive(batch, now)
            if batch.archived_at is not None:
                return req.error(404, "not_found_error", f"the results of message batch {batch_id} are no "
                                 "longer available (the batch was archived)")
            truncate = None
            rate = self.config.truncate_rate
            rng = self._random()
            if rate and rate > 0 and rng.random() < rate:
                truncate = rng.choice(("truncate_drop", "truncate_short"))
                keep = rng.randrange(len(batch.requests))
                self.stats.faults[truncate] += 1
            self.stats.results_downloads += 1
        stream = self._result_chunks(batch, keep if truncate else None, truncate == "truncate_drop")
        return Reply(200, stream=stream, content_type="application/binary")

    def _result_chunks(self, batch: _Batch, keep: Optional[int], drop: bool) -> Iterator[Any]:
        n = len(batch.requests)
        order = list(range(n))
        random.Random(batch.seed).shuffle(order)
        missing = min(n, max(0, self.config.missing_result_lines))
        if missing:   # the same lines each time: the last ones of the (per-batch) shuffled order
            order = order[:n - missing]
            n = len(order)
            keep = None if keep is None else min(keep, n)
        stop = n if keep is None else keep
        buf: list = []
        size = 0
        for pos in range(stop):
            line = self._result_line(batch, order[pos])
            buf.append(line)
            size += len(line)
            if size >= 65536:
                yield b"".join(buf)
                buf, size = [], 0
        if drop and stop < n:
            line = self._result_line(batch, order[stop])
            buf.append(line[:max(1, len(line) // 2)])
            yield b"".join(buf)
            yield _DROP
            return
        if buf:
            yield b"".join(buf)

    def _result_line(self, batch: _Batch, i: int) -> bytes:
        custom_id, params = batch.requests[i]
        code = batch.outcomes[i]
        cfg = self.config
        lean_id = f"msg_{batch.id[-16:]}{i:08d}" if cfg.lean else None   # (the lean mode's cheap message id)
        if code == SUCCEEDED and cfg.lean and cfg.report_output_tokens is None and not cfg.omit_usage \
                and cfg.usage_patch is None:
            message = replies.lean_reply(params, lean_id)
            if message is not None:
                return (f'{{"custom_id":{replies.LEAN_STRING(custom_id)},"result":{{"type":"succeeded","message":'
                        f'{message}}}}}\n').encode("utf-8")
        if code == SUCCEEDED:
            kind, n, ttl = batch.cache.get(i, (None, 0, "5m"))
            message = replies.reply_for(
                params, cache_write=n if kind == "write" else 0, cache_read=n if kind == "read" else 0,
                cache_ttl=ttl, service_tier="batch",
                message_id=lean_id or self._message_id(batch, i),
                off_schema=self.config.off_schema_rate)
            self._misreport(message)
            result = {"type": "succeeded", "message": message}
        elif code == EXPIRED:
            result = {"type": "expired"}
        elif code == CANCELED:
            result = {"type": "canceled"}
        else:
            error_type, message_text = _TRANSIENT.get(code) or batch.errors[i]
            result = {"type": "errored", "error": {"type": "error", "error": {
                "type": error_type, "message": message_text}, "request_id": self._message_id(batch, i, "req_")}}
        line = json.dumps({"custom_id": custom_id, "result": result}, ensure_ascii=False, separators=(",", ":"))
        return (line + "\n").encode("utf-8")

    @staticmethod
    def _message_id(batch: _Batch, i: int, prefix: str = "msg_") -> str:
        digest = int(hashlib.sha256(f"{prefix}{batch.seed}:{i}".encode()).hexdigest(), 16)
        out = []
        for _ in range(24):
            digest, r = divmod(digest, 62)
            out.append(_ALNUM[r])
        return prefix + "".join(out)

    # ------------------------------------------------------------------------------ batch lifecycle
    def _batch_json(self, batch: _Batch, req: Request, advance: bool = True) -> dict:
        now = self.clock()
        if advance:
            self._advance(batch, now)
            self._archive(batch, now)
        n = len(batch.requests)
        ended = batch.ended_at is not None
        if ended:
            status = "ended"
        elif batch.cancel_at is not None:
            status = "canceling"
        else:
            status = "in_progress"
        counts = batch.counts if ended else {"processing": n, "succeeded": 0, "errored": 0, "canceled": 0,
                                             "expired": 0}
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": dict(counts),
            "ended_at": iso(batch.ended_at) if ended else None,
            "created_at": iso(batch.created),
            "expires_at": iso(batch.created + EXPIRY_SECONDS),
            "archived_at": iso(batch.archived_at) if batch.archived_at is not None else None,
            "cancel_initiated_at": iso(batch.cancel_at) if batch.cancel_at is not None else None,
            "results_url": (f"{req.scheme}://{self.config.results_host or req.host}{req.prefix}"
                            f"/v1/messages/batches/{batch.id}/results"
                            if ended else None),
        }

    def _archive(self, batch: _Batch, now: float) -> None:
        if batch.ended_at is None or batch.archived_at is not None:
            return
        after = self.config.archive_after_seconds
        after = RESULTS_KEPT_SECONDS if after is None else after
        if now >= batch.created + after:
            batch.archived_at = max(batch.created + after, batch.ended_at)

    def _advance(self, batch: _Batch, now: float) -> None:
        """End the batch if its time has come (decides every request's outcome, once)."""
        if batch.ended_at is not None:
            return
        cfg = self.config
        processing = max(0.0, float(cfg.processing_seconds))
        deadline = batch.created + processing
        expiry = batch.created + EXPIRY_SECONDS
        end = min(deadline, expiry)
        canceled = False
        if batch.cancel_at is not None:
            cancel_end = batch.cancel_at + max(0.0, float(cfg.cancel_seconds))
            if cancel_end < end:
                end, canceled = cancel_end, True
        if now < end:
            return
        n = len(batch.requests)
        if canceled or end < deadline:
            stopped = batch.cancel_at if canceled else expiry
            done = int(n * min(1.0, (stopped - batch.created) / processing)) if processing > 0 else n
            rest = CANCELED if canceled else EXPIRED
        else:
            done, rest = n, EXPIRED
        self._process(batch, done, rest, end)

    def _process(self, batch: _Batch, done: int, rest: int, at: float) -> None:
        cfg = self.config
        rng = self._random()
        errored_rate = max(0.0, cfg.errored_rate or 0.0)
        expired_rate = max(0.0, cfg.expired_rate or 0.0)
        randomize = errored_rate > 0 or expired_rate > 0
        types = cfg.errored_types
        outcomes = bytearray(len(batch.requests))
        memo: dict = {}
        for i, (_, params) in enumerate(batch.requests):
            if i >= done:
                outcomes[i] = rest
                continue
            problem = (self._problem(params, batch.api_version, memo) if not cfg.lean or cfg.refuse_text
                       else None)   # (lean: no per-request checks unless a refusal is asked for)
            if problem is not None:
                outcomes[i] = ERR_NOT_FOUND if problem[0] == "not_found_error" else ERR_INVALID
                batch.errors[i] = problem
                continue
            if randomize:
                r = rng.random()
                if r < errored_rate:
                    error_type = types[int(rng.random() * len(types))] if len(types) > 1 else types[0]
                    outcomes[i] = _ERROR_CODES.get(error_type, ERR_INVALID)
                    if outcomes[i] == ERR_INVALID:
                        batch.errors[i] = (error_type, ERROR_TYPES[error_type])
                    continue
                if r < errored_rate + expired_rate:
                    outcomes[i] = EXPIRED
                    continue
            outcomes[i] = SUCCEEDED
            if cfg.lean:
                continue
            plan = replies.cache_plan(params, memo[params.get("model") if isinstance(params.get("model"), str)
                                                   else None][1])
            if plan is not None:
                key, tokens, ttl = plan
                batch.cache[i] = (self._touch_cache(key, ttl, at, batch), tokens, ttl)
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        names = {SUCCEEDED: "succeeded", EXPIRED: "expired", CANCELED: "canceled"}
        for code in outcomes:
            counts[names.get(code, "errored")] += 1
        batch.outcomes = outcomes
        batch.counts = counts
        if not cfg.lean:
            self.stats.billed.update(h for h, code in zip(batch.hashes, outcomes) if code == SUCCEEDED)
        self.stats.outcomes[batch.id] = [names.get(code, "errored") for code in outcomes]
        batch.ended_at = at

    def _touch_cache(self, key: str, ttl: str, at: float, batch: Optional[_Batch] = None) -> str:
        """Look a prefix up in the prompt cache at time `at`: "write" (a miss, now stored) or "read".

        With `cold_batches`, an item of `batch` reads only an entry that was readable when its batch was
        created: the items of one batch run concurrently and never see each other's writes, and a write
        becomes readable when its own batch ends (`at`, the end of the batch processed now)."""
        expiry = self._cache.get(key)
        live = expiry is not None and expiry > at
        if live and batch is not None and self.config.cold_batches:
            live_for_batch = self._cache_since.get(key, at) <= batch.created
        else:
            live_for_batch = live
        self._cache[key] = max(expiry if live else 0.0, at + replies.CACHE_TTLS.get(ttl, 300.0))
        if not live:
            self._cache_since[key] = at
        if live_for_batch:
            return "read"
        if len(self._cache) > 200_000:   # forget expired entries now and then
            self._cache = {k: v for k, v in self._cache.items() if v > at}
            self._cache_since = {k: v for k, v in self._cache_since.items() if k in self._cache}
        return "write"

    def _model(self, name: Any) -> tuple:
        """(known, ModelInfo or None) for a model name."""
        info = replies.model_info(name)
        if info is not None:
            return True, info
        if not isinstance(name, str):
            return False, None
        if name in self.config.extra_models or not replies.catalog_available():
            return True, replies.model_info(name, dated=True)   # a new snapshot keeps its family's rules
        return False, None

    def _problem(self, params: Any, api_version: str, memo: dict) -> Optional[tuple]:
        """Why the API would refuse this one request: (error type, message), or None."""
        if not isinstance(params, dict):
            return "invalid_request_error", "params: Input should be an object"
        name = params.get("model")
        key = name if isinstance(name, str) else None
        if key not in memo:
            memo[key] = self._model(name)
        known, info = memo[key]
        if not known:
            return "not_found_error", f"model: {name}"
        refuse = self.config.refuse_text
        if refuse and refuse in json.dumps(params.get("messages"), ensure_ascii=False):
            return "invalid_request_error", f"messages: this request holds {refuse!r}, which this emulator refuses"
        if self.config.validate:
            problem = semantic_problem(params)
            if problem:
                return "invalid_request_error", problem
        try:   # (the API version's own rules hold for a model the catalog lacks too)
            from batchrun.models import check_params
            problems = check_params(info, params, api_version)
        except ImportError:  # pragma: no cover
            problems = []
        if problems:
            return "invalid_request_error", problems[0]
        return None

    # ------------------------------------------------------------------------------ messages
    def _parse_params(self, req: Request, kind: str):
        try:
            params = req.json()
        except (ValueError, UnicodeDecodeError) as exc:
            return req.error(400, "invalid_request_error", f"The request body is not valid JSON: {exc}")
        if not isinstance(params, dict):
            return req.error(400, "invalid_request_error", "The request body must be a JSON object")
        if self.config.validate:
            try:
                check_message_params(params, "", kind=kind)
            except Invalid as exc:
                return req.error(400, "invalid_request_error", str(exc))
        return params

    def _count_tokens(self, req: Request) -> Reply:
        params = self._parse_params(req, "count_tokens")
        if isinstance(params, Reply):
            return params
        known, _ = self._model(params.get("model"))
        if not known:
            return req.error(404, "not_found_error", f"model: {params.get('model')}")
        return json_reply(200, {"input_tokens": replies.count_tokens(params)})

    async def _messages(self, req: Request) -> Reply:
        params = self._parse_params(req, "messages")
        if isinstance(params, Reply):
            return params
        api_version = req.headers.get("anthropic-version", "2023-06-01")
        problem = self._problem(params, api_version, {})
        if problem is not None:
            status = 404 if problem[0] == "not_found_error" else 400
            return req.error(status, problem[0], problem[1])
        cfg = self.config
        input_tokens = replies.count_tokens(params)
        with self._lock:
            now = self.clock()
            refusal = self._rate_check(now, input_tokens)
            if refusal is not None:
                self.stats.messages_429 += 1
                wait, what = refusal
                return req.error(429, "rate_limit_error", f"This request would exceed your rate limit of {what} "
                                 f"(emulator)", _retry_headers(wait) + self._ratelimit_headers(now))
            self._spent["requests"] += 1
            self._spent["input"] += input_tokens
        if cfg.latency and cfg.latency > 0:
            await anyio.sleep(cfg.latency)
        with self._lock:
            now = self.clock()
            write = read = 0
            ttl = "5m"
            plan = replies.cache_plan(params)
            if plan is not None:
                key, tokens, ttl = plan
                if self._touch_cache(key, ttl, now) == "write":
                    write = tokens
                else:
                    read = tokens
            message_id = self._new_id("msg_")
            self.stats.billed[params_hash(params)] += 1
        message = replies.reply_for(params, cache_write=write, cache_read=read, cache_ttl=ttl,
                                    service_tier="standard", message_id=message_id, off_schema=cfg.off_schema_rate)
        output_tokens = message["usage"]["output_tokens"]
        self._misreport(message)
        with self._lock:
            now = self.clock()
            self._refill(now)
            self._spent["output"] += output_tokens   # counted once known
            headers = self._ratelimit_headers(now)
        body = {"code": 200, "data": message} if cfg.wrap_messages else message
        return json_reply(200, body, headers)

    def _misreport(self, message: dict) -> None:
        """Usage as some gateways report it: output tokens past max_tokens, or no usage at all."""
        if self.config.report_output_tokens is not None:
            message["usage"]["output_tokens"] = self.config.report_output_tokens
        if self.config.omit_usage:
            message.pop("usage", None)
        patch = self.config.usage_patch
        if patch is not None:
            message["usage"] = {**message.get("usage", {}), **patch} if isinstance(patch, dict) else patch

    # Rate limits are token buckets, as the API's are: each holds up to its limit and refills
    # continuously at limit / rate_window per second (not all at once at the end of a window).
    def _capacities(self) -> dict:
        cfg = self.config
        return {"requests": cfg.rpm, "input": cfg.input_tpm, "output": cfg.output_tpm}

    def _refill(self, now: float) -> None:
        window = max(1e-6, float(self.config.rate_window))
        elapsed = max(0.0, now - self._refilled_at)
        self._refilled_at = max(now, self._refilled_at)
        for name, limit in self._capacities().items():
            limit = limit if limit is not None else DEFAULT_LIMITS[name]
            self._spent[name] = max(0.0, self._spent[name] - elapsed * limit / window)

    def _rate_check(self, now: float, input_tokens: int) -> Optional[tuple]:
        """(seconds to wait, which limit) when this request would exceed a limit, else None."""
        self._refill(now)
        window = max(1e-6, float(self.config.rate_window))
        # output tokens are counted when the reply is made: a request is refused once none are left
        for name, need in (("requests", 1), ("input", input_tokens), ("output", 1)):
            limit = self._capacities()[name]
            if limit is None:
                continue
            short = self._spent[name] + min(need, limit) - limit    # a request over the limit fits a full bucket
            if short > 0:
                return short * window / limit, f"{limit} {BUCKETS[name]} per {_fmt_seconds(window)} s"
        return None

    def _ratelimit_headers(self, now: float) -> list:
        """As the API's: what is left of each limit, and when its bucket will be full again."""
        self._refill(now)
        window = max(1e-6, float(self.config.rate_window))
        h = "anthropic-ratelimit-"
        headers, limits, left, full_at = [], {}, {}, {}
        for name, limit in self._capacities().items():
            limit = limits[name] = limit if limit is not None else DEFAULT_LIMITS[name]
            left[name] = max(0, math.floor(limit - self._spent[name]))
            full_at[name] = now + self._spent[name] * window / limit
            header = BUCKETS[name].replace(" ", "-")
            headers += [(h + header + "-limit", limit), (h + header + "-remaining", left[name]),
                        (h + header + "-reset", iso(full_at[name]))]
        tokens = (limits["input"] + limits["output"], left["input"] + left["output"],
                  max(full_at["input"], full_at["output"]))
        if self.config.openai_ratelimit_headers:   # as LiteLLM and other gateways: requests and tokens, reset a duration
            return [(f"x-ratelimit-{what}-{name}", value)
                    for name, (limit, remaining, full) in (("requests", (limits["requests"], left["requests"],
                                                                         full_at["requests"])), ("tokens", tokens))
                    for what, value in (("limit", limit), ("remaining", remaining),
                                        ("reset", _go_duration(full - now)))]
        return headers + [(h + "tokens-limit", tokens[0]), (h + "tokens-remaining", tokens[1]),
                          (h + "tokens-reset", iso(tokens[2]))]

    # ------------------------------------------------------------------------------ control
    def _control(self, req: Request) -> Reply:
        what = req.path[len("/_emulator/"):]
        if what == "stats" and req.method == "GET":
            with self._lock:
                return json_reply(200, self.stats.to_dict())
        if what == "config" and req.method == "GET":
            return json_reply(200, self.config.to_dict())
        if what == "config" and req.method == "POST":
            try:
                changes = req.json() if req.body else {}
            except ValueError as exc:
                return req.error(400, "invalid_request_error", f"not valid JSON: {exc}")
            if not isinstance(changes, dict):
                return req.error(400, "invalid_request_error", "send a JSON object of config fields")
            try:
                with self._lock:
                    trial = EmulatorConfig(**{k: getattr(self.config, k) for k in self.config.to_dict()})
                    trial.update(changes)
                    self.config.update(changes)
            except KeyError as exc:
                return req.error(400, "invalid_request_error", f"{exc.args[0]}: unknown config field")
            except ValueError as exc:
                return req.error(400, "invalid_request_error", str(exc))
            return json_reply(200, self.config.to_dict())
        if what == "reset" and req.method == "POST":
            self.reset()
            return json_reply(200, {"ok": True})
        if what == "batches" and req.method == "GET":
            return json_reply(200, {"ids": self.batch_ids()})
        return req.error(404, "not_found_error", f"no control endpoint {req.method} {req.path}")
