"""The HTTP clients for the Messages and Message Batches API (httpx, retries with tenacity).

As httpx splits its own: `BaseClient` holds what both share (base URL, headers and the key, timeouts,
retry policy and waits, error translation, gateway envelopes); `Client` (sync) adds the batch endpoints,
results downloads and count_tokens; `AsyncClient` adds `POST /v1/messages` for messages mode. Both go
through `http_client` (plain http never through a proxy) and `transport_error` (was the request sent?).
The transport is injectable, so the same client talks to the real API, to the emulator over
loopback, or to the emulator in-process. API errors become the project's own exceptions.

Creating a batch is not idempotent: `create_batch` never re-sends after a failure that may have
created the batch (a timeout, a dropped connection, a 5xx other than 529); it raises
`AmbiguousCreateError`, and the runner reconciles through the list endpoint before creating again.
"""
from __future__ import annotations

import datetime
import email.utils
import json
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlsplit

import httpx
import tenacity

from . import __version__
from .endpoints import (ANTHROPIC_HOST, BUILTIN_EMULATOR, DEFAULT_BASE_URL, LEGACY_LOOPBACK, base_url_origin,
                        check_secure_url, endpoint_key, endpoint_text, is_anthropic_api, is_loopback,
                        is_loopback_endpoint, shown_url)
from .spec import DEFAULT_API_VERSION
from .errors import (AmbiguousCreateError, ApiError, AuthError, GaveUpError, InputError, NoBatchApiError,
                     NoReplyError, NotFoundError, NotSentError, RequestTooLargeError, ResultsGoneError,
                     TransientApiError, UnreachableError, register_secret)

# (the endpoint rules live in endpoints.py, light to import; named here too for the modules that use both)
__all__ = ["ANTHROPIC_HOST", "BUILTIN_EMULATOR", "DEFAULT_BASE_URL", "LEGACY_LOOPBACK", "check_secure_url",
           "endpoint_key", "endpoint_text", "is_anthropic_api", "is_loopback", "is_loopback_endpoint", "shown_url",
           "RETRYABLE_STATUS", "CREATE_NOT_CREATED", "NOT_SENT", "RetryPolicy", "BaseClient", "Client", "ApiClient",
           "AsyncClient", "http_client", "asks_past", "asked_wait", "transport_error", "unwrap_gateway"]

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}
# A create answered with these statuses did not create a batch (protocol: "A 4xx/429/529 reply means
# not created"); any other failure after the request was sent may have.
CREATE_NOT_CREATED = {408, 409, 429, 529}
# Failures that prove nothing reached the API: no connection made (refused, DNS, TLS handshake, connect
# timeout), no connection from the pool, or a proxy that refused to open the tunnel (CONNECT answered non-2xx,
# a SOCKS handshake refused: https goes through a proxy only as a tunnel, so the API saw nothing)
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError)


@dataclass
class RetryPolicy:
    max_retries: int = 8            # per call
    max_wait: float = 60.0          # cap on one wait
    max_elapsed: float = 600.0      # give up on one call after this long


class BaseClient:
    """What the sync and the async client share, written once (httpx's BaseClient -> Client / AsyncClient):
    the base URL and the rule that the key goes only over https or to loopback, the auth and version
    headers (the key registered as a secret, so no message or log shows it), timeouts, the retry policy
    and its waits, and the translation of a reply into a Message or into the project's own errors
    (gateway envelopes and errors inside a 200 included). `transport` lets tests run a client against
    the emulator in process (no URL check then: nothing leaves the process)."""

    def __init__(self, *, api_key: Optional[str], base_url: Optional[str] = None,
                 api_version: str = DEFAULT_API_VERSION, auth_header: str = "x-api-key",
                 extra_headers: Optional[dict] = None, transport: Any = None,
                 timeout: float = 600.0, connect_timeout: float = 5.0,
                 retry: Optional[RetryPolicy] = None, key_source: str = "ANTHROPIC_API_KEY",
                 base_url_source: Optional[str] = None):
        register_secret(api_key)
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.shown_url = shown_url(self.base_url)   # what messages name: never a user:password@ of the URL
        if transport is None:
            check_secure_url(self.base_url, base_url_source or base_url_origin(base_url))
        api_key = (api_key or "").strip()   # a trailing newline from a file or a heredoc is not part of the key
        if not api_key:
            raise InputError(f"no API key: set {key_source} (or pass --api-key)" if key_source == "ANTHROPIC_API_KEY"
                             else f"no API key: {key_source} is empty")
        if not _HEADER_VALUE.match(api_key):
            raise InputError(f"{key_source}: the API key holds a character that cannot be sent in an HTTP header "
                             "(a control or non-ASCII character): check its value")
        self.key_source = key_source
        self.retry = retry or RetryPolicy()
        headers = {"anthropic-version": api_version, "content-type": "application/json",
                   "user-agent": f"batchrun/{__version__}"}
        for name, value in (extra_headers or {}).items():
            value = str(value).strip()
            if not _HEADER_VALUE.match(value):
                raise InputError(f"headers: the value of {name!r} holds a character that cannot be sent in an HTTP "
                                 "header (a control or non-ASCII character)")
            headers[name] = value
        if auth_header == "bearer":
            headers["authorization"] = f"Bearer {api_key}"
        else:
            headers["x-api-key"] = api_key
        self.headers = headers
        self.timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self.transport = transport
        # httpx's own transport retries (HTTPTransport(retries=N)) stay at their default, 0: a create must
        # never be re-sent behind our back (a transport of our own would also lose the HTTPS_PROXY support)

    def _http(self, cls: type, **kw: Any) -> Any:
        """The httpx client (`cls`, sync or async) every request of this client goes through."""
        return http_client(cls, base_url=self.base_url + "/", headers=self.headers, transport=self.transport,
                           timeout=self.timeout, **kw)

    def full_url(self, path: str) -> str:
        """The URL a path is sent to, base URL (and its path prefix) included: what messages name."""
        return f"{self.shown_url}/{path.lstrip('/')}"

    def _error(self, response: httpx.Response, what: str) -> ApiError:
        status = response.status_code
        error_type, message = None, None
        try:
            body = response.json()
        except (json.JSONDecodeError, ValueError, UnicodeDecodeError):
            body = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            error_type = body["error"].get("type")
            message = body["error"].get("message")
        elif isinstance(body, dict) and ("msg" in body or "message" in body):  # gateways
            message = str(body.get("msg") or body.get("message"))
        if message is None:
            snippet = response.text[:200].strip().replace("\n", " ") if response.content else ""
            message = f"unexpected reply from the server{': ' + snippet if snippet else ''}"
        request_id = response.headers.get("request-id")
        rid = f" [request-id {request_id}]" if request_id else ""
        retry_after = _retry_after(response.headers)
        should_retry = (response.headers.get("x-should-retry") or "").strip().lower()
        kw = dict(status=status, error_type=error_type, request_id=request_id, retry_after=retry_after)
        if status in (401, 403):
            verb = "authentication failed" if status == 401 else "permission denied"
            return AuthError(f"{verb} ({status} {error_type or ''}): the API refused the key from "
                             f"{self.key_source}: {message}{rid}", **kw)
        transient = status in RETRYABLE_STATUS or status >= 500
        if should_retry == "true":
            transient = True
        elif should_retry == "false":
            transient = False
        text = f"{what}: {status} {error_type or 'error'}: {message}{rid}"
        if transient:
            return TransientApiError(text, **kw)
        if status == 413:
            return RequestTooLargeError(text, **kw)
        if status == 404:
            return NotFoundError(text, **kw)
        return ApiError(text, **kw)

    def message(self, response: httpx.Response, what: str) -> dict:
        """The Message a reply to `POST /v1/messages` carries (unwrapped from a gateway's envelope), or
        the ApiError it is: an error status, an error inside a 200 (`{"code": 4xx, ...}`), or a reply
        that is not a Message."""
        if response.status_code >= 400:
            raise self._error(response, what)
        try:
            body = response.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        message = unwrap_gateway(body)
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            return message
        code = body.get("code") if isinstance(body, dict) else None
        if isinstance(code, int) and not isinstance(code, bool) and code >= 400:   # an error inside a 200
            keep = {k: v for k, v in response.headers.items()
                    if k.lower() in ("retry-after", "retry-after-ms", "x-should-retry", "request-id")}
            raise self._error(httpx.Response(code, json=body, headers=keep), what)
        snippet = response.text[:200].strip().replace("\n", " ")
        raise ApiError(f"{what}: {response.status_code} but the reply is not a Message "
                       f"({snippet or 'empty body'}): is {self.shown_url} an Anthropic Messages endpoint?",
                       status=response.status_code, request_id=response.headers.get("request-id"))

    def retry_wait(self, state: tenacity.RetryCallState) -> float:
        """As the official SDK waits: as told by retry-after-ms / retry-after (capped at max_wait),
        else 0.5 s × 2^retry capped at 8 s, times a jitter of 0.75–1."""
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ApiError) and exc.retry_after is not None and exc.retry_after > 0:
            return min(exc.retry_after, self.retry.max_wait)
        n = state.attempt_number - 1
        return min(0.5 * 2 ** n, 8.0) * random.uniform(0.75, 1.0)


class Client(BaseClient):
    """The synchronous client: the batch endpoints, results downloads and count_tokens (`sleep` and
    `clock`: what its retries wait with and measure by; tests give their own)."""

    def __init__(self, *, transport: Optional[httpx.BaseTransport] = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic, **kw: Any):
        super().__init__(transport=transport, **kw)
        self.sleep = sleep
        self.clock = clock
        # the API's clock minus ours (seconds), from the Date header of its latest reply; None before one
        self.server_offset: Optional[float] = None
        self.http = self._http(httpx.Client, event_hooks={"response": [self._watch_clock]})

    def _watch_clock(self, response: httpx.Response) -> None:
        when = _http_date(response.headers.get("date"))
        if when is not None:
            self.server_offset = when - time.time()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- plumbing ------------------------------------------------------------------------------
    def _url(self, path: str) -> str:
        return path.lstrip("/")

    def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One HTTP exchange; failures mapped to our exceptions (TransientApiError is retryable)."""
        try:
            response = self.http.request(method, self._url(path), **kw)
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise transport_error(exc, f"{method} {self.full_url(path)}") from None
        if response.status_code >= 400:
            raise self._error(response, f"{method} {self.full_url(path)}")
        return response

    def _retrying(self) -> tenacity.Retrying:
        """Retries of TransientApiError, bounded by RetryPolicy: at most max_retries retries, and no
        wait that would end past max_elapsed seconds after the first attempt; then GaveUpError."""
        started = self.clock()

        def stop(state: tenacity.RetryCallState) -> bool:
            waited = self.clock() - started + (getattr(state, "upcoming_sleep", 0.0) or 0.0)
            return state.attempt_number > self.retry.max_retries or waited > self.retry.max_elapsed \
                or asks_past(state.outcome.exception(), self.clock() - started, self.retry)

        def give_up(state: tenacity.RetryCallState) -> Any:
            exc = state.outcome.exception()
            if not isinstance(exc, TransientApiError):
                raise exc
            raise GaveUpError(f"{exc.message}; gave up after {state.attempt_number} attempts in "
                              f"{self.clock() - started:.0f} s{asked_wait(exc)}", status=exc.status, error_type=exc.error_type,
                              request_id=exc.request_id, retry_after=exc.retry_after) from None

        return tenacity.Retrying(retry=tenacity.retry_if_exception_type(TransientApiError), wait=self.retry_wait,
                                 stop=stop, sleep=self.sleep, retry_error_callback=give_up)

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """`_send` with retries on transient failures (never used for creating a batch)."""
        return self._retrying()(self._send, method, path, **kw)

    # ---- batches -------------------------------------------------------------------------------
    def create_batch(self, body: bytes) -> dict:
        """POST one batch. `body` is the JSON `{"requests": [...]}` already serialised.

        Retried (with the same waits and bounds as every call) only after a failure that proves the
        batch was not created: no connection made, or a 408 / 409 / 429 / 529 reply. Anything else
        after the request may have been sent — a timeout, a dropped connection, any other 5xx even
        with `x-should-retry: false` — raises AmbiguousCreateError and is never re-sent here.
        """
        return self._retrying()(self._create_once, body)

    def _create_once(self, body: bytes) -> dict:
        what = f"POST {self.full_url('v1/messages/batches')}"
        try:
            response = self.http.post(self._url("v1/messages/batches"), content=body)
        except httpx.RequestError as exc:
            error = transport_error(exc, what)
            if isinstance(error, NoReplyError):   # sent, and then no (whole) reply
                raise AmbiguousCreateError(f"{what}: no reply ({type(exc).__name__}); the batch may exist") from None
            raise error from None                 # never sent
        if response.status_code < 400:
            try:
                return response.json()
            except (json.JSONDecodeError, ValueError, UnicodeDecodeError):
                raise AmbiguousCreateError(f"{what}: {response.status_code} with a reply that is not JSON; "
                                           "the batch may exist") from None
        error = self._error(response, what)
        if self._no_batch_api(error):
            raise self._no_batches(error, what, "no batch was created; ") from None
        if response.status_code >= 500 and response.status_code not in CREATE_NOT_CREATED:
            raise AmbiguousCreateError(f"{error.message}; the batch may exist", status=error.status,
                                       error_type=error.error_type, request_id=error.request_id) from None
        raise error   # 408/409/429/529 are transient (retried) unless x-should-retry: false; 4xx are final

    def _no_batch_api(self, error: ApiError) -> bool:
        """A 404 or 405 on a batch endpoint at a non-Anthropic base URL: a gateway that serves only
        POST /v1/messages (LiteLLM answers 404 {"detail": "Not Found"})."""
        return error.status in (404, 405) and not is_anthropic_api(self.base_url)

    def _no_batches(self, error: ApiError, what: str, said: str = "") -> NoBatchApiError:
        return NoBatchApiError(
            f"{self.shown_url} has no Message Batches API ({what} answered {error.status}): {said}run with "
            "`--mode messages` (the Messages API, at standard prices, not the batch discount)", status=error.status,
            error_type=error.error_type, request_id=error.request_id)

    def has_batch_create(self) -> bool:
        """Whether the batch create endpoint exists, asked without creating anything: an empty batch is
        refused (400) by an API that has the endpoint; a gateway without it answers 404 or 405."""
        try:
            self._create_once(b'{"requests": []}')
        except NoBatchApiError:
            return False
        except ApiError:
            return True
        return True

    def retrieve_batch(self, batch_id: str) -> dict:
        return self._call("GET", f"v1/messages/batches/{batch_id}").json()

    def list_batches(self, *, page_size: int = 100) -> Iterator[dict]:
        """All batches, newest first, across pages."""
        after: Optional[str] = None
        while True:
            params: dict = {"limit": page_size}
            if after:
                params["after_id"] = after
            try:
                page = self._call("GET", "v1/messages/batches", params=params).json()
            except ApiError as exc:
                if self._no_batch_api(exc):
                    raise self._no_batches(exc, f"GET {self.full_url('v1/messages/batches')}") from None
                raise
            yield from page.get("data", [])
            if not page.get("has_more") or not page.get("last_id"):
                return
            after = page["last_id"]

    def cancel_batch(self, batch_id: str) -> dict:
        return self._call("POST", f"v1/messages/batches/{batch_id}/cancel").json()

    def delete_batch(self, batch_id: str) -> dict:
        return self._call("DELETE", f"v1/messages/batches/{batch_id}").json()

    def iter_results(self, results_url: str) -> Iterator[dict]:
        """Stream a batch's results, one parsed JSONL line at a time.

        A download cut short raises TransientApiError mid-iteration; the caller downloads again.
        """
        if self.transport is None:
            check_secure_url(results_url, "results_url")
        response = self._retrying()(self._open_stream, results_url)
        try:
            yield from jsonl_values(response.iter_text())
        except httpx.TransportError as exc:
            raise TransientApiError(f"results download cut short ({type(exc).__name__})") from None
        finally:
            response.close()

    def _open_stream(self, url: str) -> httpx.Response:
        try:
            request = self.http.build_request("GET", url, headers={"accept": "application/binary"})
            response = self.http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise TransientApiError(f"results download timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise TransientApiError(f"results download failed ({type(exc).__name__})") from None
        if response.status_code >= 400:
            response.read()
            error = self._error(response, "GET results")
            response.close()
            if isinstance(error, NotFoundError):
                raise ResultsGoneError(f"{error.message} (the batch's results are gone: results are kept "
                                       "29 days)", status=404, error_type=error.error_type,
                                       request_id=error.request_id)
            raise error
        return response

    # ---- messages ------------------------------------------------------------------------------
    def count_tokens(self, params: dict, *, retry: bool = True) -> int:
        """Input tokens of a request, by the API's count_tokens. `retry=False`: one attempt, no retries
        (for an endpoint not yet known to count tokens: many gateways do not). A reply without a count
        raises ApiError."""
        body = {k: v for k, v in params.items() if k in _COUNT_TOKENS_KEYS}
        path = "v1/messages/count_tokens"
        response = self._call("POST", path, json=body) if retry else self._send("POST", path, json=body)
        try:
            return int(response.json()["input_tokens"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise ApiError(f"POST {self.full_url(path)}: {response.status_code} but the reply holds no input_tokens",
                           status=response.status_code) from None



ApiClient = Client   # the name it had before the async client shared its base


class AsyncClient(BaseClient):
    """Messages mode's client: `POST /v1/messages`, up to `connections` at once, over an httpx
    AsyncClient opened (`async with`) inside the event loop that sends. `transport`: an
    httpx.AsyncBaseTransport (httpx.ASGITransport runs the emulator in process)."""

    def __init__(self, *, transport: Optional[httpx.AsyncBaseTransport] = None, connections: int = 100,
                 **kw: Any):
        super().__init__(transport=transport, **kw)
        self.connections = connections
        self.what = f"POST {self.full_url('v1/messages')}"   # logs and errors name the URL used
        self.http: Optional[httpx.AsyncClient] = None

    async def __aenter__(self) -> "AsyncClient":
        n = self.connections
        self.http = self._http(httpx.AsyncClient, limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        http, self.http = self.http, None
        await http.aclose()

    async def post_message(self, content: bytes) -> httpx.Response:
        """One `POST /v1/messages` of a serialised request: the reply, whatever its status (`message`
        reads it), or the translated failure (`transport_error`: not sent, or sent with no reply)."""
        try:
            return await self.http.post("v1/messages", content=content)
        except httpx.TransportError as exc:
            raise transport_error(exc, self.what) from None


_COUNT_TOKENS_KEYS = ("model", "messages", "system", "tools", "tool_choice", "thinking", "output_config")


_SCAN = json.JSONDecoder().scan_once    # one JSON value at a position of a str (json.loads without its checks)
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def jsonl_values(texts: Iterator[str]) -> Iterator[Any]:
    """The JSON value of each line of JSONL text that is not blank, read as json.loads reads it (a line
    is what ends at "\n": a JSON string may hold any other line separator, U+2028 say, as it is), from
    the text in pieces as it comes; a line that is not one JSON value raises TransientApiError (a file
    cut short ends in the middle of one).

    (Each piece of whole lines is split once and each line decoded by the scanner json.loads uses: a
    third cheaper than json.loads per line after httpx's iter_lines.)"""
    pending: list = []   # the pieces of a line not ended yet
    for text in texts:
        cut = text.rfind("\n") + 1
        if not cut:
            pending.append(text)
            continue
        if pending:
            pending.append(text[:cut])
            lines = "".join(pending).split("\n")
            pending = []
        else:
            lines = text[:cut].split("\n")
        lines.pop()   # (the "" after the last "\n")
        if cut < len(text):
            pending.append(text[cut:])
        yield from _line_values(lines)
    if pending:
        yield from _line_values(["".join(pending)])


def _line_values(lines: list) -> Iterator[Any]:
    scan, space = _SCAN, _JSON_SPACE.match
    for line in lines:
        if line[:1] == "{":
            start = 0
        elif not line.strip():
            continue
        else:
            start = space(line).end()
        try:
            value, end = scan(line, start)
        except (StopIteration, ValueError):   # (StopIteration: no value where one must be)
            raise TransientApiError("results download: a line was cut short") from None
        if end != len(line) and space(line, end).end() != len(line):
            raise TransientApiError("results download: a line was cut short")
        yield value


def http_client(cls: type, *, transport: Any = None, limits: Optional[httpx.Limits] = None, **kw: Any) -> Any:
    """An httpx Client or AsyncClient (`cls`) for batchrun's requests, every one of which carries the key.

    Plain-http requests (allowed only to loopback: the emulator, a local gateway) go straight to their
    host, never through a proxy from HTTP_PROXY / ALL_PROXY, which would read the key in clear. https
    requests keep the environment's proxy settings (HTTPS_PROXY, ALL_PROXY, NO_PROXY): through a proxy
    they travel in a tunnel, encrypted. A given transport (tests) is used as it is, with no proxy.
    """
    limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
    mounts = None
    if transport is None:
        direct = httpx.AsyncHTTPTransport if issubclass(cls, httpx.AsyncClient) else httpx.HTTPTransport
        # (it serves http:// URLs only, so it never speaks TLS: verify=False spares loading the CA bundle)
        mounts = {"http://": direct(limits=limits, verify=False)}
    try:
        return cls(transport=transport, limits=limits, mounts=mounts, **kw)
    except ImportError as exc:   # a SOCKS proxy in ALL_PROXY / HTTPS_PROXY without the socksio package
        if urlsplit(str(kw.get("base_url", ""))).scheme == "http":   # a loopback endpoint needs no proxy
            return cls(transport=transport, limits=limits, mounts=mounts, trust_env=False, **kw)
        raise InputError(f"proxy settings of the environment: {exc}") from None


def asks_past(exc: Optional[BaseException], elapsed: float, policy: RetryPolicy) -> bool:
    """Whether a refusal's retry-after asks for a wait that ends past the patience (`policy.max_elapsed`,
    of which `elapsed` is spent): waiting less and asking again would only be refused again, so give up now."""
    return isinstance(exc, ApiError) and exc.retry_after is not None and elapsed + exc.retry_after > policy.max_elapsed


def asked_wait(exc: ApiError) -> str:
    """What a refusal's retry-after asked for, said in a give-up message (when to run again)."""
    if exc.retry_after is None or exc.retry_after <= 1:
        return ""
    until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=exc.retry_after)
    return f"; the API asks to wait {exc.retry_after:.0f} s: run again after {until:%Y-%m-%d %H:%M:%S} UTC"


def transport_error(exc: httpx.RequestError, what: str) -> ApiError:
    """What a failed exchange says about its request, decided here once for both clients: nothing was
    delivered (NotSentError: our own client refused to send it, e.g. for a malformed header — not
    retryable; or UnreachableError: no connection made — retryable), or it was sent and no (whole)
    reply came (NoReplyError, retryable: a timeout, a dropped connection; it may have run)."""
    if isinstance(exc, httpx.LocalProtocolError):
        return NotSentError(f"{what}: the request could not be sent ({type(exc).__name__})")
    if isinstance(exc, NOT_SENT):
        return UnreachableError(f"{what}: connection failed before anything was sent ({type(exc).__name__}: {exc})",
                                error_type="connection_error")
    if isinstance(exc, httpx.TimeoutException):
        return NoReplyError(f"{what}: timed out ({type(exc).__name__})", error_type="timeout_error")
    return NoReplyError(f"{what}: connection failed ({type(exc).__name__}: {exc})", error_type="connection_error")


def unwrap_gateway(reply: Any) -> Any:
    """Some gateways answer `{"code": 200, "data": {<Message>}}`: return the Message."""
    if isinstance(reply, dict) and "data" in reply and "code" in reply and isinstance(reply["data"], dict):
        return reply["data"]
    return reply


# What h11 accepts as a header value: printable ASCII, no leading/trailing space.
_HEADER_VALUE = re.compile(r"^(?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?$")


def _retry_after(headers: httpx.Headers) -> Optional[float]:
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        when = _http_date(value)
        return None if when is None else max(0.0, when - time.time())


def _http_date(value: Optional[str]) -> Optional[float]:
    """An HTTP date (`Wed, 21 Oct 2026 07:28:00 GMT`) as a POSIX timestamp; None if it is not one."""
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:   # "-0000": UTC, not local time
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()
