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


# ---- a plain template's bodies a block at a time (plain.py) ---------------------------------------------
import pyarrow as pa  # noqa: E402

from batchrun.errors import InputError  # noqa: E402
from batchrun.requests import canonical_json, params_hash, params_hasher  # noqa: E402

CELLS = ["", "plain", 'naïve café ✓, "quoted"\nsecond line\t\\ \x00\x1f\x7f\b\f\r', "李雷 \u2028\u2029 😀",
         "100% {braces} %s %(x)s {0}", "</script>", " \t\n ", None, "x" * 3000, "\\u0041 \\\"", "\x00batchrun"]


def plain_builder(prompt, columns=("a", "b"), **keys):
    spec = JobSpec.from_mapping({"input": "x.csv", "output": "o.parquet", "prompt": prompt, **keys})
    return RequestBuilder(spec, None, list(columns))


def one_by_one(b, text):
    """The one-row path as bodies._one_by_one takes it: each row's cells as RequestBuilder.rows gives them."""
    return [canonical_json(b.row_part(row, f"row {i + 1}")) for i, row in enumerate(b.rows(text, text))]


@pytest.mark.parametrize("prompt,keys", [
    ("Review {{ a }}: {{ b }}", {}),
    ("{{ a }}", {}),
    ("{{a}}{{b}}{{a}} 100% \"q\" \\ {x}\n", {}),
    ("Rate {{ b }}", {"system": "Be brief.", "prefill": "{", "cache_system": True,
                      "few_shot": [{"user": "u %s \x00", "assistant": "a \"q\""}]}),
    ("{{ a }} and {{ b }}", {"few_shot": [{"user": "u", "assistant": "a"}], "prefill": "Sure"}),
])
def test_a_plain_templates_bodies_are_the_one_row_paths_byte_for_byte(prompt, keys):
    b = plain_builder(prompt, **keys)
    pairs = [(x, y) for x in CELLS for y in CELLS if x and x.strip() and y is not None]
    text = pa.RecordBatch.from_pydict({"a": [p[0] for p in pairs], "b": [p[1] for p in pairs]})
    got = b.plain_bodies(text)
    assert got is not None and got == one_by_one(b, text)
    assert b.plain_bodies(text.slice(0, 0)) == []


def test_null_cells_and_large_strings_render_as_one_by_one():
    b = plain_builder("{{ a }}/{{ b }}")
    text = pa.RecordBatch.from_pydict({"a": pa.array(["x", None, 'q"'], pa.large_string()), "b": ["y", "z", None]})
    assert b.plain_bodies(text) == one_by_one(b, text)


def test_typed_cells_render_as_their_text_as_one_by_one():
    """Parquet and JSONL blocks are their typed values: rendered as render_parts renders them (str())."""
    b = plain_builder("n={{ a }} d={{ b }}")
    text = pa.RecordBatch.from_pydict({"a": pa.array([1, None, -3], pa.int64()),
                                       "b": pa.array([{"k": 'v"'}, None, {"k": "\n"}])})
    assert b.plain_bodies(text) == one_by_one(b, text)


def test_a_block_with_a_row_the_one_row_path_refuses_is_left_to_it(monkeypatch):
    b = plain_builder("{{ a }}{{ b }}")
    text = pa.RecordBatch.from_pydict({"a": ["x", " ", None], "b": ["y", "\n", ""]})
    assert b.plain_bodies(text) is None   # rows 2 and 3 render an empty prompt
    with pytest.raises(InputError, match="row 2 renders an empty message"):
        one_by_one(b, text)
    assert plain_builder("x {{ a }}").plain_bodies(text) is not None   # text in the template: never empty
    monkeypatch.setattr("batchrun.plain.MAX_PROMPT", 45)   # (a bound: the block's cells could make a longer one)
    long = pa.RecordBatch.from_pydict({"a": ["x" * 40, "y"], "b": ["z" * 6, "w"]})
    assert b.plain_bodies(long) is None
    assert b.plain_bodies(pa.RecordBatch.from_pydict({"a": ["x" * 30, "y"], "b": ["z" * 10, "w"]})) is not None


@pytest.mark.parametrize("prompt,keys", [("{{ a | upper }}", {}), ("{{ a }}", {"max_tokens_column": "b"}),
                                         ("{{ a }}", {"image_column": "b"}), ("{{ lipsum }}", {})])
def test_other_jobs_are_rendered_one_by_one(prompt, keys):
    b = plain_builder(prompt, columns=("a", "b", "lipsum"), **keys)
    assert b.plain_bodies(pa.RecordBatch.from_pydict({"a": ["x"], "b": ["1"], "lipsum": ["z"]})) is None


def test_params_hasher_is_params_hash():
    for shared in ("", "ab" * 32):
        hash_ = params_hasher(shared)
        for body in CELLS[:-4]:
            assert hash_(body) == params_hash(body, shared)


def test_custom_ids_at_once_are_custom_id_for_one_by_one():
    from batchrun.requests import custom_id_for, custom_ids
    fine = ["T-1", "a_b", "x" * 64, "0"]
    assert custom_ids(pa.array(fine)) == [custom_id_for(v) for v in fine]
    assert custom_ids(pa.array(fine, pa.large_string())) == fine
    for odd in (["T-1", "x" * 65], ["T-1", "a b"], ["T-1", ""], ["T-1", None], ["T-1", "abc\n"], ["T-1", "é"]):
        assert custom_ids(pa.array(odd)) is None   # (one by one: hashed, refused as empty, or as Python reads it)
    assert custom_ids(pa.array([1, 2])) is None


@pytest.mark.parametrize("name", ["range", "dict", "cycler", "joiner", "namespace"])
def test_a_column_named_like_a_jinja_global_renders_as_the_one_row_path_does(name):
    """Both paths make the same body (the one-row path, and every plan before the block renderer, are given no
    such cell: it renders ""), so a job planned before keeps its hashes and is sent, not refused as changed."""
    b = plain_builder("Summarise: {{ %s }}" % name, columns=("id", name))
    text = pa.RecordBatch.from_pydict({"id": ["r1"], name: ["hello"]})
    assert b.plain_bodies(text) is None and one_by_one(b, text) == [canonical_json(
        b.row_part({}, "row 1"))]


def test_a_jinja_global_that_is_no_column_renders_as_before():
    b = plain_builder("Say {{ body }} {{ range }}", columns=("id", "body"))
    text = pa.RecordBatch.from_pydict({"id": ["r1"], "body": ["hello"]})
    assert b.plain_bodies(text) is None and "Say hello " in one_by_one(b, text)[0]
