"""The sample datasets in samples/ and the job files in jobs/: they parse, and they fit together."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import jinja2
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from jinja2 import meta

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
JOBS = ROOT / "jobs"
JOB_FILES = sorted(JOBS.glob("*.toml"))


def read_csv(path: Path):
    return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(newlines_in_values=True))


def read_input(path: Path):
    return pq.read_table(path) if path.suffix == ".parquet" else read_csv(path)


@pytest.fixture(scope="module")
def tickets():
    return read_csv(SAMPLES / "tickets.csv")


@pytest.fixture(scope="module")
def reviews():
    return read_csv(SAMPLES / "reviews.csv")


@pytest.fixture(scope="module")
def articles():
    return pq.read_table(SAMPLES / "articles.parquet")


def assert_ids(table, column):
    ids = table.column(column)
    assert ids.null_count == 0
    values = ids.to_pylist()
    assert all(v not in ("", None) for v in values)
    assert len(set(values)) == len(values), f"{column} has duplicates"


# ---- datasets ----------------------------------------------------------------------------------

def test_tickets_shape(tickets):
    assert tickets.num_rows == 300
    assert tickets.column_names == ["ticket_id", "created_at", "customer", "channel", "subject", "body"]
    assert_ids(tickets, "ticket_id")
    ids = tickets.column("ticket_id").to_pylist()
    assert all(re.fullmatch(r"T-\d{5}", i) for i in ids)
    numbers = [int(i[2:]) for i in ids]
    assert any(b - a > 1 for a, b in zip(numbers, numbers[1:])), "ids should be sparse, not consecutive"
    assert set(tickets.column("channel").to_pylist()) <= {"email", "chat", "phone", "", None}
    # created_at holds ISO dates (pyarrow infers a date type for them)
    assert str(tickets.schema.field("created_at").type) in ("date32[day]", "timestamp[s]")


def test_tickets_have_the_hard_cases(tickets):
    rows = tickets.to_pylist()
    bodies = [r["body"] for r in rows]
    assert any("\n" in b for b in bodies), "no quoted newline inside a body"
    assert any('"' in b for b in bodies), "no double quote inside a body"
    assert any("," in b for b in bodies), "no comma inside a body"
    assert any(r["customer"] and not r["customer"].isascii() for r in rows), "no unicode customer name"
    assert any(r[c] in ("", None) for r in rows for c in ("customer", "channel")), "no empty cell"
    assert all(b.strip() for b in bodies)
    # the raw file really quotes its newlines: more physical lines than records
    raw = (SAMPLES / "tickets.csv").read_text(encoding="utf-8")
    assert raw.count("\n") > len(rows) + 1


def test_reviews_shape(reviews):
    assert reviews.num_rows == 400
    assert reviews.column_names == ["review_id", "product", "rating", "review_text"]
    assert_ids(reviews, "review_id")
    assert str(reviews.schema.field("review_id").type) == "int64"
    assert str(reviews.schema.field("rating").type) == "int64"
    assert set(reviews.column("rating").to_pylist()) == {1, 2, 3, 4, 5}
    texts = reviews.column("review_text").to_pylist()
    assert all(t and t.strip() for t in texts)
    assert any(not t.isascii() for t in texts), "no emoji or non-English review"


def test_articles_shape(articles):
    assert articles.num_rows == 200
    assert articles.column_names == ["article_id", "published", "section", "title", "body"]
    assert_ids(articles, "article_id")
    assert all(re.fullmatch(r"a-\d{4}", i) for i in articles.column("article_id").to_pylist())
    assert str(articles.schema.field("published").type) == "date32[day]"
    for body in articles.column("body").to_pylist():
        assert 120 <= len(body.split()) <= 400


# ---- job files ---------------------------------------------------------------------------------

def load_job(path: Path) -> dict:
    with path.open("rb") as f:
        return tomllib.load(f)


def test_the_three_jobs_exist():
    assert {p.name for p in JOB_FILES} >= {"label-tickets.toml", "classify-reviews.toml",
                                            "summarise-articles.toml"}


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_job_file(path: Path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#"), "a job file starts with a comment saying what it does"
    assert f"batchrun run jobs/{path.name}" in text and "--emulator" in text
    job = load_job(path)
    base = path.parent
    for key in ("name", "input", "output", "id_column", "model", "max_tokens"):
        assert key in job, f"missing {key}"
    # files named in the job exist, relative to the job file
    input_path = base / job["input"]
    assert input_path.is_file(), input_path
    for key in ("prompt_file", "system_file"):
        if key in job:
            assert (base / job[key]).is_file(), job[key]
    if isinstance(job.get("output_schema"), str):
        assert (base / job["output_schema"]).is_file()
    assert ("prompt" in job) != ("prompt_file" in job)
    assert not ("system" in job and "system_file" in job)
    # the template only names columns the input has
    table = read_input(input_path)
    prompt = job["prompt"] if "prompt" in job else (base / job["prompt_file"]).read_text(encoding="utf-8")
    names = meta.find_undeclared_variables(jinja2.Environment().parse(prompt))
    assert names, "the prompt uses no column"
    assert names - {"row"} <= set(table.column_names), names - set(table.column_names)
    assert job["id_column"] in table.column_names


def test_label_tickets_job():
    job = load_job(JOBS / "label-tickets.toml")
    assert job["model"] == "claude-haiku-4-5" and job["cache_system"] is True
    assert job["max_tokens"] == 300 and job["batch_size"] == 100
    schema = job["output_schema"]
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == set(schema["properties"]) == {"category", "urgency", "tags", "needs_human"}
    props = schema["properties"]
    assert props["category"]["enum"] == ["billing", "account", "bug", "feature_request", "shipping",
                                         "refund", "praise", "other"]
    assert (props["urgency"]["type"], props["urgency"]["minimum"], props["urgency"]["maximum"]) == ("integer", 1, 5)
    assert props["tags"]["type"] == "array" and props["tags"]["maxItems"] == 5
    assert props["needs_human"]["type"] == "boolean"


def test_ticket_instructions_are_long_enough_to_cache():
    # Haiku 4.5 caches no prefix under 4,096 tokens; 20,000 characters is ~5,000 tokens of English
    job = load_job(JOBS / "label-tickets.toml")
    guide = (JOBS / job["system_file"]).read_text(encoding="utf-8")
    assert len(guide) >= 20_000
    paragraphs = [p.strip() for p in guide.split("\n\n") if len(p.strip()) > 40]
    assert len(paragraphs) == len(set(paragraphs)), "repeated paragraphs"
    for category in ("billing", "account", "bug", "feature_request", "shipping", "refund", "praise", "other"):
        assert f"`{category}`" in guide


def test_classify_reviews_job():
    job = load_job(JOBS / "classify-reviews.toml")
    assert job["labels"] == ["positive", "negative", "neutral", "mixed"]
    assert job["model"] == "claude-haiku-5-5" and job["max_tokens"] == 50
    assert not {"temperature", "top_p", "top_k"} & set(job), "Haiku 5.5 takes no sampling parameters"


def test_summarise_articles_job():
    job = load_job(JOBS / "summarise-articles.toml")
    assert job["model"] == "claude-haiku-5-5" and job["max_tokens"] == 200
    assert job["poll_interval"] == "2m"
    assert "output_schema" not in job and "labels" not in job
    assert "--no-wait" in (JOBS / "summarise-articles.toml").read_text(encoding="utf-8")


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_job_file_loads_in_batchrun(path: Path):
    """The real loader accepts the file (skipped while batchrun.spec cannot be imported)."""
    try:
        from batchrun.spec import JobSpec
    except ImportError as exc:  # pragma: no cover
        pytest.skip(f"batchrun.spec not importable: {exc}")
    spec = JobSpec.load(str(path))
    assert Path(spec.input).is_file()
