"""Which service a base URL names, and whether the key may be sent to it: no httpx, so light to import.

`endpoint_key` is part of a job's identity (answers from one service are never taken for another's);
`check_secure_url` refuses to send the key in clear text; `shown_url` is a URL as messages may show it.
The clients (`api.py`) apply these rules; `api` re-exports them.
"""
from __future__ import annotations

import ipaddress
import os
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

from .errors import InputError

DEFAULT_BASE_URL = "https://api.anthropic.com"
ANTHROPIC_HOST = "api.anthropic.com"
BUILTIN_EMULATOR = "builtin:emulator"   # the endpoint key of the emulator `--emulator` starts, whatever its port
LEGACY_LOOPBACK = "http://loopback"     # the key every loopback URL had before ports counted (see Runner)


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


def base_url_origin(base_url: Optional[str]) -> str:
    """Where the base URL came from, for error messages, when the caller does not say."""
    env = os.environ.get("ANTHROPIC_BASE_URL")
    return "ANTHROPIC_BASE_URL" if base_url and env and base_url.rstrip("/") == env.rstrip("/") else "base URL"
