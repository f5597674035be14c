"""Job keys are declared once, in JobSpec (with their flags): every key is a flag of run, validate,
estimate and cancel, or explicitly marked file-only, and a key given in a job file or by its flag
makes the same spec."""
from __future__ import annotations

import dataclasses
import json

import click
import pytest

from batchrun.cli import main
from batchrun.cli.common import spec_from_options
from batchrun.spec import FILE_ONLY, JOB_KEYS, JobSpec, _FILE_KEYS, job_flags, tomllib

COMMANDS = ("run", "validate", "estimate", "cancel")


def options_of(command: str) -> dict:
    return {p.name: p for p in main.commands[command].params if isinstance(p, click.Option)}


def test_every_job_key_is_a_flag_or_marked_file_only():
    fields = {f.name for f in dataclasses.fields(JobSpec)}
    assert set(JOB_KEYS) == fields - {"source", "cache_ttl_defaulted"}   # every field is a key but those two
    flagged = {key for key, _ in job_flags()}
    for key, flag in JOB_KEYS.items():
        assert (key in flagged) == (flag is not FILE_ONLY), key
    assert set(_FILE_KEYS) <= flagged and set(_FILE_KEYS.values()) <= set(JOB_KEYS)
    assert {k for k, f in JOB_KEYS.items() if f is FILE_ONLY} == {"metadata", "few_shot", "headers"}
    for command in COMMANDS:
        options = options_of(command)
        for key in flagged:
            option = options[key]
            assert not option.hidden and option.opts[0] == "--" + key.replace("_", "-"), (command, key)
            assert option.help, (command, key)
        for key, flag in JOB_KEYS.items():
            if flag is FILE_ONLY:
                assert key not in options, (command, key)


def test_enumerations_come_from_the_spec():
    from batchrun.spec import AUTH_HEADERS, CACHE_TTLS, EFFORT_LEVELS, MODES
    options = options_of("run")
    for key, values in (("effort", EFFORT_LEVELS), ("cache_ttl", CACHE_TTLS), ("mode", MODES),
                        ("auth_header", AUTH_HEADERS)):
        assert tuple(options[key].type.choices) == values, key


# ---- a key in a job file, and its flag, give the same spec ------------------------------------------

def sample(key: str, flag, tmp_path) -> tuple:
    """(the key's value in a job file, the flag's arguments, other keys it needs) for one job key."""
    (tmp_path / "other.csv").write_text("id,text\n1,hello\n", encoding="utf-8")
    (tmp_path / "text.txt").write_text("From a file: {{ text }}", encoding="utf-8")
    (tmp_path / "schema.json").write_text(json.dumps({"type": "object", "properties": {"x": {"type": "string"}}}),
                                          encoding="utf-8")
    special = {"input": str(tmp_path / "other.csv"), "prompt_file": str(tmp_path / "text.txt"),
               "system_file": str(tmp_path / "text.txt"), "output_schema": str(tmp_path / "schema.json"),
               "poll_interval": "2m", "api_version": "2026-10-21", "thinking": "adaptive", "shard": "2/3"}
    needs = {"multi_label": {"labels": ["a", "b"]}, "prefill_in_text": {"prefill": "Sure"},
             "cache_ttl": {"cache_system": True}}.get(key, {})
    default = {f.name: f.default for f in dataclasses.fields(JobSpec)}.get(key)
    if key in special:
        value = special[key]
    elif flag.choices:
        value = next(choice for choice in flag.choices if choice != default)
    elif flag.switch:
        value = True
    elif flag.negatable:
        value = not default
    elif flag.many:
        value = ["x1", "x2"]
    elif flag.type is int:
        value = 7
    elif flag.type is float:
        value = 0.5
    elif key in ("output", "state", "image_dir", "models_file"):
        value = str(tmp_path / f"{key}.out")
    else:
        value = "x"
    opt = "--" + key.replace("_", "-")
    if flag.switch:
        args = [opt]
    elif flag.negatable:
        args = [opt if value else f"--no-{opt[2:]}"]
    elif flag.many:
        args = [a for v in value for a in (opt, v)]
    else:
        args = [opt, str(value)]
    return value, args, needs


def toml_line(key: str, value) -> str:
    text = f"{key} = {json.dumps(value)}\n"
    assert tomllib.loads(text)[key] == value
    return text


def parsed(tmp_path, job_file, args) -> JobSpec:
    """The spec `batchrun validate JOB args` would run (parsed by click, as the command line is)."""
    parent = click.Context(main, info_name="batchrun", **main.context_settings)   # (as `batchrun validate` has)
    ctx = main.commands["validate"].make_context("validate", [str(job_file), *args], parent=parent)
    params = dict(ctx.params)
    return spec_from_options(params.pop("job_file"), params)


@pytest.mark.parametrize("key,flag", job_flags(), ids=[key for key, _ in job_flags()])
def test_a_key_in_the_job_file_and_its_flag_give_the_same_spec(tmp_path, key, flag, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.csv").write_text("id,text\n1,hello\n", encoding="utf-8")
    value, args, needs = sample(key, flag, tmp_path)
    base = {"input": "in.csv", "prompt": "{{ text }}", **needs}
    with_key = {k: v for k, v in base.items() if k != _FILE_KEYS.get(key)}   # (prompt_file: without prompt)
    in_file = tmp_path / "with-key.toml"
    in_file.write_text("".join(toml_line(k, v) for k, v in {**with_key, key: value}.items()), encoding="utf-8")
    without = tmp_path / "without-key.toml"
    without.write_text("".join(toml_line(k, v) for k, v in base.items()), encoding="utf-8")
    from_file, from_flag = parsed(tmp_path, in_file, []), parsed(tmp_path, without, args)
    assert from_file == from_flag
    assert from_file != parsed(tmp_path, without, []), key   # (and the key made a difference)


def test_path_keys_in_a_job_file_are_relative_to_it(tmp_path, monkeypatch):
    from batchrun.spec import _PATH_KEYS
    assert set(_PATH_KEYS) == {"input", "output", "state", "image_dir", "models_file", "prompt_file", "system_file"}
    sub = tmp_path / "jobs"
    sub.mkdir()
    (sub / "p.txt").write_text("{{ text }}", encoding="utf-8")
    (sub / "s.txt").write_text("be brief", encoding="utf-8")
    job = sub / "job.toml"
    job.write_text('input = "in.csv"\noutput = "o.parquet"\nstate = "s.sqlite"\nimage_dir = "imgs"\n'
                   'models_file = "m.toml"\nprompt_file = "p.txt"\nsystem_file = "s.txt"\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    spec = JobSpec.load(str(job))
    assert (spec.prompt, spec.system) == ("{{ text }}", "be brief")
    for key, name in (("input", "in.csv"), ("output", "o.parquet"), ("state", "s.sqlite"), ("image_dir", "imgs"),
                      ("models_file", "m.toml")):
        assert getattr(spec, key) == str(sub.resolve() / name), key
