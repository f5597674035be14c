"""The fast path for plain `{{ column }}` templates renders exactly as Jinja2 does."""
from __future__ import annotations

import datetime as dt

import pytest

from batchrun.requests import RequestBuilder
from batchrun.spec import JobSpec

ROWS = [
    {"a": "text, with \"quotes\"\nand lines", "b": 3, "c": 1.5, "d": None, "e": True,
     "f": dt.date(2026, 11, 23), "g": "ünïcødé 🚀", "h": ""},
    {"a": "", "b": -0, "c": 1e20, "d": "x", "e": False, "f": None, "g": "{{ not a template }}", "h": "{% x %}"},
]


def builder(prompt, fast=True):
    spec = JobSpec.from_mapping({"input": "x.csv", "output": "o.parquet", "prompt": prompt})
    b = RequestBuilder(spec, None, list(ROWS[0]))
    if not fast:
        b._parts = None
    return b


@pytest.mark.parametrize("prompt", [
    "{{ a }}|{{ b }}|{{ c }}|{{ d }}|{{ e }}|{{ f }}|{{ g }}|{{ h }}",
    "Row:\n{{a}}\n\n{{ g }} end\n",
    "no variables at all",
])
def test_fast_path_equals_jinja(prompt):
    fast, slow = builder(prompt), builder(prompt, fast=False)
    assert fast._parts is not None
    for row in ROWS:
        assert fast.build(row, "row 1") == slow.build(row, "row 1")


@pytest.mark.parametrize("prompt", ["{{ a | upper }}", "{% if e %}yes{% endif %}", "{{ row['a'] }}", "{{ a ~ b }}"])
def test_other_templates_use_jinja(prompt):
    assert builder(prompt)._parts is None
    builder(prompt).build(ROWS[0], "row 1")
