"""The HTTP client for the Messages and Message Batches API (httpx, retries with tenacity).

The transport is injectable, so the same client talks to the real API, to the emulator over
loopback, or to the emulator in-process. API errors become the project's own exceptions.

Creating a batch is not idempotent: `create_batch` never re-sends after a failure that may have
created the batch (a timeout, a dropped connection, a 5xx other than 529); it raises
`AmbiguousCreateError`, and the runner reconciles through the list endpoint before creating again.
"""
from __future__ import annotations

import datetime
import email.utils
import ipaddress
import json
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional
from urllib.parse import urlsplit, urlunsplit

import httpx
import tenacity

from . import __version__
from .spec import DEFAULT_API_VERSION
from .errors import (AmbiguousCreateError, ApiError, AuthError, GaveUpError, InputError, NoBatchApiError,
                     NotFoundError, RequestTooLargeError, ResultsGoneError, TransientApiError, UnreachableError,
                     register_secret)

DEFAULT_BASE_URL = "https://api.anthropic.com"
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}
# A create answered with these statuses did not create a batch (protocol: "A 4xx/429/529 reply means
# not created"); any other failure after the request was sent may have.
CREATE_NOT_CREATED = {408, 409, 429, 529}
# Failures before any byte of the request left: no connection (refused, DNS, TLS, connect timeout) or
# none free in the pool. Nothing was delivered, so nothing can have run or been paid for.
# failures that prove nothing reached the API: no connection made (refused, DNS, TLS handshake, connect
# timeout), no connection from the pool, or a proxy that refused to open the tunnel (CONNECT answered non-2xx,
# a SOCKS handshake refused: https goes through a proxy only as a tunnel, so the API saw nothing)
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError)


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_secure_url(url: str, what: str = "ANTHROPIC_BASE_URL") -> None:
    """Refuse to send the key in clear text: https, or plain http to loopback only."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
        return
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"{what}: {url!r} is not an http(s) URL")
    raise InputError(f"{what}: https is required for {parts.hostname} (plain http would send the API key "
                     "across the network in clear text; http is allowed only to loopback)")


BUILTIN_EMULATOR = "builtin:emulator"   # the endpoint key of the emulator `--emulator` starts, whatever its port
LEGACY_LOOPBACK = "http://loopback"     # the key every loopback URL had before ports counted (see Runner)


def endpoint_key(base_url: Optional[str]) -> Optional[str]:
    """Which service answers a job, as part of its identity: None for the Anthropic API itself.

    Answers from one service are never taken for another's: a job run on the emulator and then
    against the real API (or through another gateway, a local proxy, an ssh tunnel) is a new job,
    and the requests it shares with the first are sent, not answered from the first one's replies.
    The key is the scheme, host, port and path prefix of every URL, loopback included (two servers
    on 127.0.0.1 are two services); the emulator that `--emulator` starts on a free port is keyed
    apart, as BUILTIN_EMULATOR, by whoever starts it.
    """
    parts = urlsplit((base_url or DEFAULT_BASE_URL).strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:   # an IPv6 address keeps its brackets
        host = f"[{host}]"
    path = parts.path.rstrip("/")
    try:
        port = parts.port
    except ValueError:   # not a number, or out of range
        port = 0
    if port == 0:
        raise InputError(f"base URL {base_url!r} (ANTHROPIC_BASE_URL or --base-url): its port must be a number "
                         "from 1 to 65535")
    if port is not None and port != {"https": 443, "http": 80}.get(scheme):
        host = f"{host}:{port}"
    key = f"{scheme}://{host}{path}"
    return None if key == DEFAULT_BASE_URL else key


ANTHROPIC_HOST = "api.anthropic.com"


def shown_url(url: str) -> str:
    """A URL as messages and logs may show it: without the credentials a user:password@ part carries."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def is_anthropic_api(base_url: Optional[str]) -> bool:
    """Whether a base URL is the Anthropic API's host (whatever its path: `https://api.anthropic.com/v1`
    is a mistyped base URL of the Anthropic API, not a gateway)."""
    host = (urlsplit((base_url or DEFAULT_BASE_URL).strip()).hostname or "").lower().rstrip(".")
    return host == ANTHROPIC_HOST


def is_loopback_endpoint(key: Optional[str]) -> bool:
    """Whether an endpoint key names a server on loopback (by its URL; the built-in emulator's is not one)."""
    host = urlsplit(key).hostname if key and "://" in key else None
    return bool(host) and is_loopback(host)


def endpoint_text(key: Optional[str]) -> str:
    """An endpoint key as a user reads it."""
    if key == BUILTIN_EMULATOR:
        return "the built-in emulator (--emulator)"
    if key == LEGACY_LOOPBACK:
        return "a loopback address (port not recorded)"
    return key or DEFAULT_BASE_URL


@dataclass
class RetryPolicy:
    max_retries: int = 8            # per call
    max_wait: float = 60.0          # cap on one wait
    max_elapsed: float = 600.0      # give up on one call after this long


class ApiClient:
    """A small synchronous client. `transport` lets tests run it against the emulator in-process."""

    def __init__(self, *, api_key: Optional[str], base_url: Optional[str] = None,
                 api_version: str = DEFAULT_API_VERSION, auth_header: str = "x-api-key",
                 extra_headers: Optional[dict] = None, transport: Optional[httpx.BaseTransport] = None,
                 timeout: float = 600.0, connect_timeout: float = 5.0,
                 retry: Optional[RetryPolicy] = None, key_source: str = "ANTHROPIC_API_KEY",
                 base_url_source: Optional[str] = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
        register_secret(api_key)
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.shown_url = shown_url(self.base_url)   # what messages name: never a user:password@ of the URL
        if transport is None:
            check_secure_url(self.base_url, base_url_source or _base_url_source(base_url))
        api_key = (api_key or "").strip()   # a trailing newline from a file or a heredoc is not part of the key
        if not api_key:
            raise InputError(f"no API key: set {key_source} (or pass --api-key)" if key_source == "ANTHROPIC_API_KEY"
                             else f"no API key: {key_source} is empty")
        if not _HEADER_VALUE.match(api_key):
            raise InputError(f"{key_source}: the API key holds a character that cannot be sent in an HTTP header "
                             "(a control or non-ASCII character): check its value")
        self.key_source = key_source
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        self.clock = clock
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
        self._transport_injected = transport is not None
        # httpx's own transport retries (HTTPTransport(retries=N)) stay at their default, 0: a create must
        # never be re-sent behind our back (a transport of our own would also lose the HTTPS_PROXY support)
        # the API's clock minus ours (seconds), from the Date header of its latest reply; None before one
        self.server_offset: Optional[float] = None
        self.http = http_client(httpx.Client, base_url=self.base_url + "/", headers=headers, transport=transport,
                                timeout=httpx.Timeout(timeout, connect=connect_timeout),
                                event_hooks={"response": [self._watch_clock]})

    def _watch_clock(self, response: httpx.Response) -> None:
        when = _http_date(response.headers.get("date"))
        if when is not None:
            self.server_offset = when - time.time()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "ApiClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- plumbing ------------------------------------------------------------------------------
    def _url(self, path: str) -> str:
        return path.lstrip("/")

    def full_url(self, path: str) -> str:
        """The URL a path is sent to, base URL (and its path prefix) included: what messages name."""
        return f"{self.shown_url}/{path.lstrip('/')}"

    def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One HTTP exchange; failures mapped to our exceptions (TransientApiError is retryable)."""
        try:
            response = self.http.request(method, self._url(path), **kw)
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise transport_error(exc, f"{method} {self.full_url(path)}") from None
        if response.status_code >= 400:
            raise self._error(response, f"{method} {self.full_url(path)}")
        return response

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

    def _wait(self, state: tenacity.RetryCallState) -> float:
        """As the official SDK waits: as told by retry-after-ms / retry-after (capped at max_wait),
        else 0.5 s × 2^retry capped at 8 s, times a jitter of 0.75–1."""
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, ApiError) and exc.retry_after is not None and exc.retry_after > 0:
            return min(exc.retry_after, self.retry.max_wait)
        n = state.attempt_number - 1
        return min(0.5 * 2 ** n, 8.0) * random.uniform(0.75, 1.0)

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

        return tenacity.Retrying(retry=tenacity.retry_if_exception_type(TransientApiError), wait=self._wait,
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
        except NOT_SENT as exc:                   # never sent
            raise transport_error(exc, what) from None
        except httpx.LocalProtocolError as exc:   # refused by our own client before sending
            raise transport_error(exc, what) from None
        except httpx.RequestError as exc:         # sent, and then no (whole) reply
            raise AmbiguousCreateError(f"{what}: no reply ({type(exc).__name__}); the batch may exist") from None
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
        if not self._transport_injected:
            check_secure_url(results_url, "results_url")
        response = self._retrying()(self._open_stream, results_url)
        try:
            for line in response.iter_lines():
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        raise TransientApiError("results download: a line was cut short") from None
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

    def create_message(self, params: dict) -> dict:
        reply = self._call("POST", "v1/messages", json=params).json()
        return unwrap_gateway(reply)


_COUNT_TOKENS_KEYS = ("model", "messages", "system", "tools", "tool_choice", "thinking", "output_config")


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
    """A timeout or a failed connection, as a retryable error (a request our own client refused to
    send, e.g. for a malformed header, is not retryable)."""
    if isinstance(exc, httpx.LocalProtocolError):
        return ApiError(f"{what}: the request could not be sent ({type(exc).__name__})")
    if isinstance(exc, NOT_SENT):
        return UnreachableError(f"{what}: connection failed before anything was sent ({type(exc).__name__}: {exc})",
                                error_type="connection_error")
    if isinstance(exc, httpx.TimeoutException):
        return TransientApiError(f"{what}: timed out ({type(exc).__name__})", error_type="timeout_error")
    return TransientApiError(f"{what}: connection failed ({type(exc).__name__}: {exc})",
                             error_type="connection_error")


def unwrap_gateway(reply: Any) -> Any:
    """Some gateways answer `{"code": 200, "data": {<Message>}}`: return the Message."""
    if isinstance(reply, dict) and "data" in reply and "code" in reply and isinstance(reply["data"], dict):
        return reply["data"]
    return reply


def _base_url_source(base_url: Optional[str]) -> str:
    """Where the base URL came from, for error messages, when the caller does not say."""
    env = os.environ.get("ANTHROPIC_BASE_URL")
    return "ANTHROPIC_BASE_URL" if base_url and env and base_url.rstrip("/") == env.rstrip("/") else "base URL"


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
