"""A job's identity: its spec checked against the catalog, its input opened and hashed, its id settled.

`Job` is what the planner, the drivers and the library share about one job; nothing here touches the
network. `resolve_connection` reads the key and base URL as the official SDK does (the endpoint is part
of a job's identity); `sent_elsewhere` says why a stored job cannot be moved on from here;
`warnings_for` says what will work but probably not as the user hopes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

from .api import BUILTIN_EMULATOR, DEFAULT_BASE_URL, LEGACY_LOOPBACK, endpoint_text, is_loopback_endpoint
from .errors import InputError
from .bodies import input_for
from .models import Catalog, CatalogError, ModelInfo, load_catalog
from .spec import JobSpec, cache_minimum, cached_prefix_tokens
from .store import Store

log = logging.getLogger("batchrun")


def resolve_connection(api_key: Optional[str], base_url: Optional[str]) -> tuple[Optional[str], str, str]:
    """Key and base URL as the official SDK reads them; returns (key, key_source, base_url)."""
    if api_key:
        source = "--api-key"
    else:
        api_key, source = os.environ.get("ANTHROPIC_API_KEY"), "ANTHROPIC_API_KEY"
    base = base_url or os.environ.get("ANTHROPIC_BASE_URL") or DEFAULT_BASE_URL
    return api_key, source, base


def warnings_for(spec: JobSpec, model: Optional[ModelInfo], builder: object = None) -> list:
    """Things that will work but probably not as the user hopes (`builder`: unused, kept for callers)."""
    out = []
    if model is None:
        return out
    if spec.cache_system and (spec.system or spec.few_shot):
        approx = cached_prefix_tokens(spec)
        minimum = cache_minimum(model)
        what = "the system prompt" if not spec.few_shot else "the cached prefix (system prompt and few-shot turns)"
        if minimum is None:
            out.append(f"cache_system: the minimum cacheable prompt of {spec.model} is not known; "
                       "check cache_creation_input_tokens in the output")
        elif approx < minimum:
            out.append(f"cache_system: {what} is about {approx} tokens, below the {minimum}-token "
                       f"minimum {spec.model} caches: it will not be cached")
    elif spec.cache_system:
        out.append("cache_system: there is no system prompt (or few-shot turns) to cache")
    thinking = (spec.thinking or {}).get("type") or model.thinking_default
    if thinking in ("enabled", "adaptive"):
        budget = (spec.thinking or {}).get("budget_tokens") or 0
        room = spec.max_tokens - budget
        if spec.max_tokens < 1024 or (budget and room < 256):
            out.append(f"max_tokens: {spec.model} thinks ({thinking}) within max_tokens = {spec.max_tokens}; "
                       "leave room for the answer (e.g. max_tokens ≥ 1024 above any thinking budget)")
    return out


class Job:
    """A job made ready to run: its spec checked against the catalog, its input opened and hashed.

    Nothing here touches the network.
    """

    def __init__(self, spec: JobSpec, *, catalog: Optional[Catalog] = None, allow_unknown_model: bool = False,
                 endpoint: Optional[str] = None, job_id: Optional[str] = None):
        self.spec = spec
        self.endpoint = endpoint   # endpoint_key() of the service the job is sent to
        try:
            self.catalog = catalog or load_catalog(spec.models_file)
        except CatalogError as exc:
            raise InputError(str(exc)) from None
        self.model: Optional[ModelInfo] = self.catalog.resolve(spec.model)
        if self.model is None and not allow_unknown_model:
            raise InputError(f"model: unknown model {spec.model!r} (not in the model catalog; add it with "
                             "--models FILE, or pass --allow-unknown-model to run it with cost unknown)")
        if self.model is not None and job_id is None and not self.catalog.is_listed(spec.model):
            log.warning("model: %s is not in the model catalog; it is taken as a snapshot of %s (its prices and "
                        "rules); add it with --models-file FILE if it differs", spec.model, self.model.id)
        self.store = Store(spec.state_path)
        self.legacy_loopback: Optional[str] = None   # see Runner._continue_legacy_loopback
        if job_id is None:
            self.source = input_for(spec, {})
            self.fingerprint = self.source.fingerprint()
            self.id = self.id_for(spec)
            if endpoint is not None and not self.store.job(self.id):
                # planned before the endpoint was part of a job's identity (its endpoint not kept): it is
                # this job, with its batches in flight and its answers, not a new one to pay for again
                legacy = self.store.job(spec.identity(self.fingerprint))
                if legacy is not None and legacy["endpoint"] is None:
                    self.id = legacy["id"]
                elif is_loopback_endpoint(endpoint):
                    # planned when every loopback URL counted as one endpoint: this job only if this
                    # server proves it (Runner._continue_legacy_loopback)
                    legacy = self.store.job(spec.identity(self.fingerprint, LEGACY_LOOPBACK))
                    if legacy is not None and legacy["endpoint"] == LEGACY_LOOPBACK:
                        self.legacy_loopback = legacy["id"]
            if spec.cache_ttl_defaulted and spec.cache_ttl == "1h" and not self.store.job(self.id) \
                    and self.legacy_loopback is None:
                self._five_minute_job(spec)
        else:  # a job already in the state file, its input not read (see Runner.for_stored_job)
            self.source, self.fingerprint, self.id = None, None, job_id

    def _five_minute_job(self, spec: JobSpec) -> None:
        """A cached batch job planned when batch jobs cached for 5 minutes by default is that job, with its
        5-minute requests, not a new one to pay for again."""
        old = dataclasses.replace(spec, cache_ttl="5m")
        row = self.store.job(self.id_for(old))
        if row is None and self.endpoint is not None:   # (and planned before the endpoint was kept)
            row = self.store.job(old.identity(self.fingerprint))
            row = row if row is not None and row["endpoint"] is None else None
        if row is not None:
            self.id, spec.cache_ttl = row["id"], "5m"
            log.info("job %s: planned with the 5-minute cache (the default then): it keeps it", self.short_id)

    def id_for(self, spec: JobSpec) -> str:
        """The id `spec` has over this job's input, endpoint and catalog (this job's own id for its own spec)."""
        return spec.identity(self.fingerprint, self.endpoint, self.catalog.fingerprint)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    def close(self) -> None:
        self.store.close()


def sent_elsewhere(job_id: str, sent_to: Optional[str], here: Optional[str]) -> Optional[str]:
    """Why a stored job cannot be moved on through the endpoint `here` (an `endpoint_key`, "" or None
    for the Anthropic API): it was sent to `sent_to` (its recorded endpoint; None: not recorded)."""
    if sent_to is None or sent_to == (here or ""):
        return None
    hint = ("only `batchrun run --emulator` moves it on (the emulator's batches end with the command that "
            "started it)" if sent_to == BUILTIN_EMULATOR else
            "set ANTHROPIC_BASE_URL (or --base-url, base_url=) to its endpoint")
    return f"job {job_id[:12]} was sent to {endpoint_text(sent_to)}, not to {endpoint_text(here or None)}: {hint}"
