"""The model catalog: prices and capabilities per model, loaded from a data file users can extend.

INTERFACE STUB — to be implemented. Other modules rely on exactly these names.
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Mapping, Optional


@dataclass(frozen=True)
class Prices:
    """USD per million tokens at the standard (non-batch) rate."""
    input: Decimal
    output: Decimal
    cache_write_5m: Decimal
    cache_write_1h: Decimal
    cache_read: Decimal


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


class Catalog:
    def resolve(self, name: str) -> Optional[ModelInfo]: ...
    def cost(self, model: str, usage: Mapping, *, batch: bool, cache_ttl: str = "5m") -> Optional[Decimal]: ...


def load_catalog(extra_path=None) -> Catalog: ...


def check_params(model: ModelInfo, params: Mapping, api_version: str) -> list: ...
