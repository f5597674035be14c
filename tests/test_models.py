from __future__ import annotations

from decimal import Decimal as D
from pathlib import Path

import pytest

from batchrun.models import (
    Catalog,
    CatalogError,
    ModelInfo,
    Prices,
    UnknownModel,
    check_params,
    load_catalog,
)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


@pytest.fixture(autouse=True)
def no_env_catalog(monkeypatch):
    monkeypatch.delenv("BATCHRUN_MODELS", raising=False)


# ------------------------------------------------------------------------------------ data

# (names that must resolve, input, output, 5m write, 1h write, read) — straight from the doc's tables
PRICED = [
    (["claude-fable-5-1"], "10", "50", None, None, None),
    (["claude-opus-5-5"], "4", "20", "5", "8", "0.20"),
    (["claude-opus-5"], "5", "25", "6.25", "10", "0.50"),
    (["claude-sonnet-5-5"], "2", "10", "2.50", "4", "0.20"),
    (["claude-sonnet-5"], "2", "10", "2.50", "4", "0.20"),
    (["claude-haiku-5-5"], "0.10", "0.50", "0.125", "0.20", "0.01"),
    (["claude-opus-4-6"], "5", "25", "6.25", "10", "0.50"),
    (["claude-sonnet-4-6"], "3", "15", "3.75", "6", "0.30"),
    (["claude-opus-4-5", "claude-opus-4-5-20251101"], "5", "25", "6.25", "10", "0.50"),
    (["claude-opus-4-1", "claude-opus-4-1-20250805"], "15", "75", "18.75", "30", "1.50"),
    (["claude-opus-4", "claude-opus-4-20250514"], "15", "75", "18.75", "30", "1.50"),
    (["claude-sonnet-4-5", "claude-sonnet-4-5-20250929"], "3", "15", "3.75", "6", "0.30"),
    (["claude-sonnet-4", "claude-sonnet-4-20250514"], "3", "15", "3.75", "6", "0.30"),
    (["claude-3-7-sonnet", "claude-3-7-sonnet-20250219"], "3", "15", "3.75", "6", "0.30"),
    (["claude-haiku-4-5", "claude-haiku-4-5-20251001"], "1", "5", "1.25", "2", "0.10"),
    (["claude-3-5-haiku", "claude-3-5-haiku-20241022"], "0.80", "4", "1.00", "1.60", "0.08"),
    (["claude-3-haiku", "claude-3-haiku-20240307"], "0.25", "1.25", "0.3125", "0.50", "0.025"),
]


def _dec(x):
    return None if x is None else D(x)


@pytest.mark.parametrize("names,inp,out,w5,w1,read", PRICED, ids=[p[0][0] for p in PRICED])
def test_every_priced_model_resolves_with_its_five_prices(catalog, names, inp, out, w5, w1, read):
    models = {catalog.resolve(n) for n in names}
    assert len(models) == 1
    model = models.pop()
    assert model is not None and model.id == names[0]
    assert model.prices == Prices(D(inp), D(out), _dec(w5), _dec(w1), _dec(read))


@pytest.mark.parametrize("name", ["claude-opus-4-7", "claude-opus-4-8", "claude-mythos-5-1"])
def test_unpriced_models_are_listed_without_prices(catalog, name):
    model = catalog.resolve(name)
    assert model is not None and model.prices is None


def test_resolve_is_exact(catalog):
    assert catalog.resolve("Claude-Haiku-4-5") is None
    assert catalog.resolve("claude-haiku") is None
    assert catalog.resolve("gpt-5") is None
    with pytest.raises(UnknownModel, match="claude-haiku-4-5"):
        catalog.require("claude-haiku-4.5")


def test_tiers(catalog):
    (haiku_tier,) = catalog.resolve("claude-haiku-5-5").tiers
    assert haiku_tier.above_prompt_tokens == 100_000
    assert haiku_tier.prices == Prices(D("0.50"), D("2.50"), D("0.625"), D("1.00"), D("0.05"))
    for name in ("claude-sonnet-4-5", "claude-sonnet-4"):
        (tier,) = catalog.resolve(name).tiers
        assert tier.above_prompt_tokens == 200_000
        assert tier.prices == Prices(D("6"), D("22.50"), D("7.50"), D("12"), D("0.60"))
    assert catalog.resolve("claude-sonnet-4-6").tiers == ()


NO_SAMPLING = {"claude-opus-4-7", "claude-opus-4-8", "claude-opus-5", "claude-opus-5-5", "claude-sonnet-5",
               "claude-sonnet-5-5", "claude-haiku-5-5", "claude-fable-5-1", "claude-mythos-5-1"}
NO_FORCED_TOOL = {"claude-opus-5-5", "claude-fable-5-1", "claude-mythos-5-1"}
NO_STRUCTURED = {"claude-opus-4-1", "claude-opus-4", "claude-sonnet-4", "claude-3-7-sonnet", "claude-3-5-haiku",
                 "claude-3-haiku"}
ADAPTIVE = {"claude-opus-5", "claude-opus-5-5", "claude-sonnet-5", "claude-sonnet-5-5", "claude-haiku-5-5",
            "claude-fable-5-1", "claude-mythos-5-1"}
NEW_TOKENIZER = ADAPTIVE | {"claude-opus-4-7", "claude-opus-4-8"}
EFFORT = ADAPTIVE | {"claude-opus-4-5", "claude-opus-4-6", "claude-opus-4-7", "claude-opus-4-8"}


def test_capabilities(catalog):
    models = catalog.models()
    assert len(models) == 20
    for m in models:
        assert m.sampling == (m.id not in NO_SAMPLING), m.id
        assert m.forced_tool == (m.id not in NO_FORCED_TOOL), m.id
        assert m.structured_output == (m.id not in NO_STRUCTURED), m.id
        assert m.thinking_default == ("adaptive" if m.id in ADAPTIVE else "off"), m.id
        assert m.new_tokenizer == (m.id in NEW_TOKENIZER), m.id
        assert m.effort == (m.id in EFFORT), m.id
        if m.id in ADAPTIVE:
            assert m.max_output_tokens == 300_000
            assert "adaptive" in m.thinking
    thinking = {m.id: set(m.thinking) for m in models}
    assert thinking["claude-opus-5-5"] == {"adaptive", "enabled"}
    assert thinking["claude-fable-5-1"] == {"adaptive", "enabled"}
    assert thinking["claude-sonnet-5"] == {"adaptive", "disabled"}
    assert thinking["claude-opus-5"] == {"adaptive", "enabled", "disabled"}
    assert thinking["claude-3-7-sonnet"] == {"enabled", "disabled"}
    assert thinking["claude-3-haiku"] == thinking["claude-3-5-haiku"] == set()


def test_cache_minimums(catalog):
    expected = {
        "claude-opus-5": 512, "claude-fable-5-1": 512, "claude-mythos-5-1": 512,
        "claude-sonnet-5": 1024, "claude-opus-4-8": 1024, "claude-sonnet-4-5": 1024, "claude-sonnet-4": 1024,
        "claude-opus-4": 1024, "claude-opus-4-1": 1024, "claude-3-7-sonnet": 1024,
        "claude-sonnet-4-6": 2048, "claude-3-haiku": 2048, "claude-3-5-haiku": 2048,
        "claude-haiku-4-5": 4096, "claude-opus-4-5": 4096, "claude-opus-4-6": 4096, "claude-opus-4-7": 4096,
        "claude-haiku-5-5": None, "claude-opus-5-5": None, "claude-sonnet-5-5": None,
    }
    assert {m.id: m.cache_min_tokens for m in catalog.models()} == expected


# ------------------------------------------------------------------------------------ cost

def test_cost_standard_and_batch_with_5m_writes_and_reads(catalog):
    usage = {"input_tokens": 1000, "output_tokens": 500, "cache_creation_input_tokens": 2000,
             "cache_read_input_tokens": 10_000}
    # 1000×1 + 500×5 + 2000×1.25 + 10000×0.10 = 7000 per million
    assert catalog.cost("claude-haiku-4-5", usage, batch=False) == D("0.007")
    assert catalog.cost("claude-haiku-4-5-20251001", usage, batch=True) == D("0.0035")


def test_cost_1h_writes_by_setting(catalog):
    usage = {"input_tokens": 1000, "output_tokens": 500, "cache_creation_input_tokens": 2000,
             "cache_read_input_tokens": 10_000}
    # 1000×1 + 500×5 + 2000×2 + 10000×0.10 = 8500 per million
    assert catalog.cost("claude-haiku-4-5", usage, batch=False, cache_ttl="1h") == D("0.0085")
    with pytest.raises(ValueError):
        catalog.cost("claude-haiku-4-5", usage, batch=False, cache_ttl="1d")


def test_cost_splits_writes_by_ttl_breakdown(catalog):
    usage = {"input_tokens": 100, "output_tokens": 200, "cache_creation_input_tokens": 3000,
             "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000}}
    # Opus 5: 100×5 + 200×25 + 1000×6.25 + 2000×10 = 31750 per million
    assert catalog.cost("claude-opus-5", usage, batch=False) == D("0.03175")
    assert catalog.cost("claude-opus-5", usage, batch=True) == D("0.015875")
    # the breakdown wins over cache_ttl
    assert catalog.cost("claude-opus-5", usage, batch=False, cache_ttl="1h") == D("0.03175")


def test_cost_absent_or_null_usage_fields_count_as_zero(catalog):
    usage = {"input_tokens": None, "output_tokens": 10, "cache_creation": None}
    assert catalog.cost("claude-haiku-4-5", usage, batch=False) == D("0.00005")
    assert catalog.cost("claude-haiku-4-5", {}, batch=True) == 0


def test_cost_haiku_5_5_long_prompt_tier(catalog):
    # 90k input + 20k cache read = 110k > 100k: every figure ×5
    usage = {"input_tokens": 90_000, "cache_read_input_tokens": 20_000, "output_tokens": 1000}
    # 90000×0.50 + 20000×0.05 + 1000×2.50 = 48500 per million
    assert catalog.cost("claude-haiku-5-5", usage, batch=False) == D("0.0485")
    assert catalog.cost("claude-haiku-5-5", usage, batch=True) == D("0.02425")
    # exactly 100k is not above the threshold: 100000×0.10 + 1000×0.50 = 10500 per million
    usage = {"input_tokens": 100_000, "output_tokens": 1000}
    assert catalog.cost("claude-haiku-5-5", usage, batch=False) == D("0.0105")


def test_cost_sonnet_4_5_long_context_tier(catalog):
    # 150k input + 60k cache write = 210k > 200k: 6.00 / 22.50 / 7.50 (5m write)
    usage = {"input_tokens": 150_000, "cache_creation_input_tokens": 60_000, "output_tokens": 2000}
    # 150000×6 + 60000×7.5 + 2000×22.5 = 1,395,000 per million
    assert catalog.cost("claude-sonnet-4-5-20250929", usage, batch=False) == D("1.395")
    assert catalog.cost("claude-sonnet-4-5", usage, batch=True) == D("0.6975")
    # below the threshold: 150000×3 + 2000×15 = 480,000 per million
    assert catalog.cost("claude-sonnet-4-5", {"input_tokens": 150_000, "output_tokens": 2000},
                        batch=False) == D("0.48")


def test_cost_opus_5_5_reads_at_005x(catalog):
    usage = {"cache_read_input_tokens": 1_000_000}
    assert catalog.cost("claude-opus-5-5", usage, batch=False) == D("0.20")
    assert catalog.cost("claude-opus-5-5", usage, batch=True) == D("0.10")
    prices = catalog.resolve("claude-opus-5-5").prices
    assert prices.cache_read / prices.input == D("0.05")


def test_cost_unknown_model_or_unpriced_figure_is_none(catalog):
    usage = {"input_tokens": 1000, "output_tokens": 100}
    assert catalog.cost("gpt-5", usage, batch=False) is None
    assert catalog.cost("claude-opus-4-8", usage, batch=False) is None
    assert catalog.cost("claude-mythos-5-1", {}, batch=False) is None
    # Fable 5.1: input/output known (1000×10 + 100×50 = 15000), cache figures unknown
    assert catalog.cost("claude-fable-5-1", usage, batch=False) == D("0.015")
    assert catalog.cost("claude-fable-5-1", {**usage, "cache_read_input_tokens": 1}, batch=False) is None
    assert catalog.cost("claude-fable-5-1", {**usage, "cache_creation_input_tokens": 5}, batch=True) is None


# ------------------------------------------------------------------------------------ user files

def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "my-models.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_user_file_overrides_a_price_and_adds_models(tmp_path):
    path = _write(tmp_path, """
[models.claude-haiku-4-5-20251001]   # by alias
prices = { input = 2.00 }
cache_min_tokens = 2048

[models.claude-opus-4-8]
prices = { input = 5, output = 25, cache_write_5m = 6.25, cache_write_1h = 10, cache_read = 0.5 }

[models.my-proxy-model]
like = "claude-opus-5"
aliases = ["my-proxy-model-2026"]
prices = { input = 1.5, output = 7.5 }

[models.tiny-local]
sampling = true
forced_tool = true
structured_output = false
thinking = []
thinking_default = "off"
effort = false
new_tokenizer = false
""")
    cat = load_catalog(path)
    haiku = cat.resolve("claude-haiku-4-5")
    assert haiku.prices == Prices(D("2.00"), D("5.00"), D("1.25"), D("2.00"), D("0.10"))
    assert haiku.cache_min_tokens == 2048
    assert haiku.aliases == ("claude-haiku-4-5-20251001",)
    assert cat.cost("claude-haiku-4-5", {"input_tokens": 1_000_000}, batch=False) == D("2")
    assert cat.cost("claude-opus-4-8", {"input_tokens": 1_000_000}, batch=True) == D("2.5")

    proxy = cat.resolve("my-proxy-model-2026")
    assert proxy.id == "my-proxy-model"
    assert proxy.thinking == cat.resolve("claude-opus-5").thinking and not proxy.sampling
    assert proxy.prices == Prices(D("1.5"), D("7.5"))
    assert cat.cost("my-proxy-model", {"input_tokens": 1000}, batch=False) == D("0.0015")
    assert cat.cost("my-proxy-model", {"cache_read_input_tokens": 1000}, batch=False) is None

    tiny = cat.resolve("tiny-local")
    assert tiny.prices is None and tiny.max_output_tokens is None and tiny.cache_min_tokens is None
    assert cat.cost("tiny-local", {"input_tokens": 1}, batch=False) is None

    # the shipped catalog is untouched
    assert load_catalog().resolve("claude-haiku-4-5").prices.input == D("1.00")


def test_user_file_from_environment(tmp_path, monkeypatch):
    path = _write(tmp_path, "[models.claude-3-haiku]\nprices = { output = 1.50 }\n")
    monkeypatch.setenv("BATCHRUN_MODELS", str(path))
    assert load_catalog().resolve("claude-3-haiku-20240307").prices.output == D("1.50")


@pytest.mark.parametrize("text,names", [
    ("[models.claude-haiku-4-5\nprices = 1", []),                                     # not TOML
    ("[models.claude-haiku-4-5]\nprices = { input = -1 }\n", ["claude-haiku-4-5", "prices.input"]),
    ("[models.claude-haiku-4-5]\nprices = { input = 'cheap' }\n", ["claude-haiku-4-5", "prices.input"]),
    ("[models.claude-haiku-4-5]\nprices = { inptu = 1 }\n", ["claude-haiku-4-5", "prices.inptu"]),
    ("[models.claude-haiku-4-5]\nsampling = 'yes'\n", ["claude-haiku-4-5", "sampling"]),
    ("[models.claude-haiku-4-5]\ntemprature = 1\n", ["claude-haiku-4-5", "temprature"]),
    ("[models.claude-haiku-4-5]\nthinking = ['sometimes']\n", ["claude-haiku-4-5", "thinking"]),
    ("[models.new-model]\nprices = { input = 1, output = 2 }\n", ["new-model", "sampling"]),
    ("[models.new-model]\nlike = 'no-such-model'\n", ["new-model", "like", "no-such-model"]),
    ("[models.new-model]\nlike = 'claude-opus-5'\nprices = { input = 1 }\n", ["new-model", "prices.output"]),
    ("[models.claude-opus-5]\naliases = ['claude-haiku-4-5']\n", ["claude-opus-5", "aliases"]),
    ("[models.claude-sonnet-4]\ntiers = [{ above_prompt_tokens = 10 }]\n", ["claude-sonnet-4", "tiers[0]"]),
    ("[model.claude-opus-5]\nsampling = true\n", ["model"]),
])
def test_malformed_user_file_names_file_and_key(tmp_path, text, names):
    path = _write(tmp_path, text)
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for name in names:
        assert name in message


def test_missing_user_file(tmp_path):
    with pytest.raises(CatalogError, match="nope.toml"):
        load_catalog(tmp_path / "nope.toml")


# ------------------------------------------------------------------------------------ check_params

def _params(model: str, **extra) -> dict:
    return {"model": model, "max_tokens": 2048, "messages": [{"role": "user", "content": "hi"}], **extra}


def _check(catalog, name, api_version="2023-06-01", **extra):
    return check_params(catalog.resolve(name), _params(name, **extra), api_version)


def test_valid_params_have_no_problems(catalog):
    assert _check(catalog, "claude-haiku-5-5") == []
    assert _check(catalog, "claude-haiku-5-5", "2026-10-21",
                  output_config={"effort": "low", "format": {"type": "json_schema", "schema": {}}},
                  thinking={"type": "disabled"}, tool_choice={"type": "auto"}) == []
    assert _check(catalog, "claude-haiku-4-5", temperature=0, top_p=0.9, top_k=5,
                  tool_choice={"type": "tool", "name": "label"}) == []
    assert _check(catalog, "claude-haiku-4-5", temperature=1, top_p=0.95,
                  thinking={"type": "enabled", "budget_tokens": 1024}, tool_choice={"type": "auto"}) == []


@pytest.mark.parametrize("extra,named", [
    ({"tool_choice": {"type": "tool", "name": "label"}}, "tool_choice"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"temperature": 0.5}, "temperature"),
    ({"top_k": 5}, "top_k"),
    ({"top_p": 0.9}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The"}]}, "prefill"),
])
def test_what_thinking_refuses(catalog, extra, named):
    """The extended thinking docs: no forced tool use, no prefill, temperature only 1, no top_k,
    top_p only from 0.95."""
    assert _check(catalog, "claude-haiku-4-5", **extra) == []                 # thinking off: fine
    (problem,) = _check(catalog, "claude-haiku-4-5", thinking={"type": "enabled", "budget_tokens": 1024}, **extra)
    assert named in problem and "thinks" in problem


def test_temperature_refused_by_a_model_without_sampling(catalog):
    (problem,) = _check(catalog, "claude-haiku-5-5", temperature=0)
    assert "temperature" in problem and "claude-haiku-5-5" in problem


def test_temperature_depends_on_api_version(catalog):
    assert _check(catalog, "claude-haiku-4-5", "2023-06-01", temperature=0.2) == []
    (problem,) = _check(catalog, "claude-haiku-4-5", "2026-10-21", temperature=0.2)
    assert "temperature" in problem and "claude-haiku-4-5" in problem and "2026-10-21" in problem
    problems = _check(catalog, "claude-haiku-4-5", "2026-10-21", top_p=0.5, top_k=5)
    assert len(problems) == 2 and "top_p" in problems[0] and "top_k" in problems[1]


def test_forced_tool_choice_refused_on_opus_5_5(catalog):
    for kind in ("tool", "any"):
        (problem,) = _check(catalog, "claude-opus-5-5", tool_choice={"type": kind, "name": "x"})
        assert "tool_choice" in problem and "claude-opus-5-5" in problem
    assert _check(catalog, "claude-opus-5-5", tool_choice={"type": "auto"}) == []
    assert _check(catalog, "claude-opus-5", tool_choice={"type": "any"}) == []


def test_thinking_types(catalog):
    (problem,) = _check(catalog, "claude-opus-5-5", thinking={"type": "disabled"})
    assert "thinking" in problem and "disabled" in problem and "claude-opus-5-5" in problem
    (problem,) = _check(catalog, "claude-sonnet-5", thinking={"type": "enabled", "budget_tokens": 1024})
    assert "budget_tokens" in problem and "claude-sonnet-5" in problem
    assert _check(catalog, "claude-sonnet-5", thinking={"type": "adaptive"}) == []
    (problem,) = _check(catalog, "claude-3-haiku", thinking={"type": "enabled", "budget_tokens": 1024})
    assert "thinking" in problem and "claude-3-haiku" in problem
    (problem,) = _check(catalog, "claude-haiku-4-5", thinking={"type": "adaptive"})
    assert "adaptive" in problem


def test_thinking_budget(catalog):
    (problem,) = _check(catalog, "claude-haiku-4-5", thinking={"type": "enabled", "budget_tokens": 512})
    assert "budget_tokens" in problem and "1024" in problem
    (problem,) = _check(catalog, "claude-haiku-4-5", thinking={"type": "enabled"})
    assert "budget_tokens" in problem
    (problem,) = _check(catalog, "claude-haiku-4-5", thinking={"type": "enabled", "budget_tokens": 2048})
    assert "max_tokens" in problem  # budget must be below max_tokens (2048)


def test_output_config(catalog):
    fmt = {"format": {"type": "json_schema", "schema": {"type": "object"}}}
    (problem,) = _check(catalog, "claude-3-5-haiku", output_config=fmt)
    assert "output_config.format" in problem and "claude-3-5-haiku" in problem
    (problem,) = _check(catalog, "claude-haiku-4-5", output_config={"effort": "high"})
    assert "output_config.effort" in problem and "claude-haiku-4-5" in problem
    (problem,) = _check(catalog, "claude-opus-4-5", output_config={"effort": "extreme"})
    assert "output_config.effort" in problem and "extreme" in problem
    assert _check(catalog, "claude-opus-4-5", output_config={"effort": "max", **fmt}) == []


def test_max_tokens(catalog):
    model = catalog.resolve("claude-3-haiku")
    (problem,) = check_params(model, {**_params("claude-3-haiku"), "max_tokens": 8192}, "2023-06-01")
    assert "max_tokens" in problem and "claude-3-haiku" in problem and "4096" in problem
    (problem,) = check_params(model, {**_params("claude-3-haiku"), "max_tokens": 0}, "2023-06-01")
    assert "max_tokens" in problem
    assert check_params(catalog.resolve("claude-opus-5"), {**_params("x"), "max_tokens": 300_000}, "2023-06-01") == []
    # unknown limit: not checked
    assert check_params(catalog.resolve("claude-opus-4-8"), {**_params("x"), "max_tokens": 10**6}, "2023-06-01") == []


def test_check_params_takes_any_model_info():
    model = ModelInfo(id="m", aliases=(), prices=None, tiers=(), sampling=True, forced_tool=True,
                      structured_output=False, thinking=(), thinking_default="off", effort=False,
                      cache_min_tokens=None, new_tokenizer=False, max_output_tokens=None)
    assert check_params(model, _params("m", temperature=1), "2023-06-01") == []
