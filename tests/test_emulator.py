"""The API emulator: its replies parse with the official SDK, it validates like the API, it injects faults."""
from __future__ import annotations

import asyncio
import json
import time

import anthropic
import httpx
import jsonschema
import pytest
from anthropic.types.messages import MessageBatchIndividualResponse

from batchrun.emulator import Emulator, EmulatorConfig, serve_in_thread
from batchrun.emulator import replies
from batchrun.emulator.replies import count_tokens, reply_for, schema_value
from batchrun.emulator.validation import MESSAGE_PARAM_KEYS

FAST = dict(processing_seconds=0.0, retry_after=0.01)
HAIKU = "claude-haiku-4-5"       # cache minimum 4096, no thinking by default
OPUS = "claude-opus-4-1"         # cache minimum 1024, accepts sampling under 2023-06-01


@pytest.fixture(scope="module")
def server():
    emu = Emulator(EmulatorConfig(**FAST))
    handle = serve_in_thread(emu, host="127.0.0.1", port=0)
    yield emu, handle
    handle.stop()


@pytest.fixture
def emu(server):
    emulator, _ = server
    emulator.reset()
    emulator.config = EmulatorConfig(**FAST)
    return emulator


@pytest.fixture
def base_url(server):
    return server[1].base_url


@pytest.fixture
def sdk(emu, base_url):
    return anthropic.Anthropic(base_url=base_url, api_key="test", max_retries=0)


@pytest.fixture
def http(emu, base_url):
    with httpx.Client(base_url=base_url, headers={"anthropic-version": "2023-06-01", "x-api-key": "test"},
                      timeout=30) as client:
        yield client


def params(text: str, model: str = HAIKU, **extra) -> dict:
    return {"model": model, "max_tokens": 200, "messages": [{"role": "user", "content": text}], **extra}


def requests_for(n: int, model: str = HAIKU, prefix: str = "row", **extra) -> list:
    return [{"custom_id": f"{prefix}-{i}", "params": params(f"text number {i}", model, **extra)} for i in range(n)]


def wait_ended(sdk, batch_id: str, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        batch = sdk.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended":
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.01)


def results(sdk, batch_id: str) -> dict:
    return {r.custom_id: r for r in sdk.messages.batches.results(batch_id)}


# ------------------------------------------------------------------------------------ batches


def test_batch_lifecycle_with_the_sdk(emu, sdk, base_url):
    emu.config.processing_seconds = 0.1
    reqs = requests_for(40)
    batch = sdk.messages.batches.create(requests=reqs)
    assert batch.id.startswith("msgbatch_") and len(batch.id) == len("msgbatch_") + 24
    assert batch.processing_status == "in_progress" and batch.results_url is None
    assert batch.request_counts.processing == 40 and batch.request_counts.succeeded == 0
    assert (batch.expires_at - batch.created_at).total_seconds() == 24 * 3600
    assert sdk.messages.batches.retrieve(batch.id).processing_status == "in_progress"

    ended = wait_ended(sdk, batch.id)
    assert ended.request_counts.succeeded == 40 and ended.request_counts.processing == 0
    assert ended.ended_at is not None
    assert ended.results_url == f"{base_url}/v1/messages/batches/{batch.id}/results"

    lines = list(sdk.messages.batches.results(batch.id))
    assert all(isinstance(r, MessageBatchIndividualResponse) for r in lines)
    assert sorted(r.custom_id for r in lines) == sorted(r["custom_id"] for r in reqs)
    assert [r.custom_id for r in lines] != [r["custom_id"] for r in reqs]      # shuffled
    by_id = {r["custom_id"]: r["params"] for r in reqs}
    for line in lines:
        assert line.result.type == "succeeded"
        message = line.result.message
        expected = reply_for(by_id[line.custom_id])
        assert message.content[0].text == expected["content"][0]["text"]
        assert message.content[0].text.startswith("Reply to: text number ")
        assert message.usage.input_tokens == expected["usage"]["input_tokens"] > 0
        assert message.usage.output_tokens == expected["usage"]["output_tokens"] > 0
        assert message.usage.service_tier == "batch" and message.model == HAIKU
        assert message.id.startswith("msg_")
    assert len({line.result.message.id for line in lines}) == 40
    # downloading again gives the same file
    assert [r.custom_id for r in sdk.messages.batches.results(batch.id)] == [r.custom_id for r in lines]
    assert emu.stats.batches_created == 1 and emu.stats.requests_created == 40
    assert set(emu.stats.submitted_custom_ids.values()) == {1}
    assert sum(emu.stats.billed.values()) == 40


def test_errored_expired_and_canceled_results(emu, sdk):
    emu.config.errored_rate, emu.config.expired_rate = 0.3, 0.2
    batch = sdk.messages.batches.create(requests=requests_for(200))
    got = results(sdk, wait_ended(sdk, batch.id).id)
    kinds = {r.result.type for r in got.values()}
    assert kinds == {"succeeded", "errored", "expired"}
    counts = wait_ended(sdk, batch.id).request_counts
    assert counts.succeeded + counts.errored + counts.expired == 200
    assert counts.errored == sum(1 for r in got.values() if r.result.type == "errored")
    errors = {r.result.error.error.type for r in got.values() if r.result.type == "errored"}
    assert errors <= {"overloaded_error", "api_error"} and errors

    # a retried request can succeed: outcomes are drawn per attempt, not per custom_id
    again = results(sdk, sdk.messages.batches.create(requests=requests_for(200)).id)
    assert {cid for cid, r in got.items() if r.result.type == "errored"} != \
           {cid for cid, r in again.items() if r.result.type == "errored"}

    emu.config.errored_rate = emu.config.expired_rate = 0.0
    emu.config.processing_seconds, emu.config.cancel_seconds = 30, 0.05
    batch = sdk.messages.batches.create(requests=requests_for(10))
    canceling = sdk.messages.batches.cancel(batch.id)
    assert canceling.processing_status == "canceling" and canceling.cancel_initiated_at is not None
    ended = wait_ended(sdk, batch.id)
    assert ended.request_counts.canceled == 10
    assert {r.result.type for r in results(sdk, batch.id).values()} == {"canceled"}
    assert sum(emu.stats.billed.values()) == sum(1 for r in [*got.values(), *again.values()]
                                                 if r.result.type == "succeeded")


def test_list_pagination(emu, sdk, http):
    ids = [sdk.messages.batches.create(requests=requests_for(1)).id for _ in range(5)]
    page = http.get("/v1/messages/batches", params={"limit": 2}).json()
    assert [b["id"] for b in page["data"]] == ids[::-1][:2]                  # newest first
    assert page["has_more"] is True and page["first_id"] == ids[4] and page["last_id"] == ids[3]
    page = http.get("/v1/messages/batches", params={"limit": 2, "after_id": page["last_id"]}).json()
    assert [b["id"] for b in page["data"]] == [ids[2], ids[1]] and page["has_more"]
    page = http.get("/v1/messages/batches", params={"limit": 2, "after_id": ids[1]}).json()
    assert [b["id"] for b in page["data"]] == [ids[0]] and page["has_more"] is False
    page = http.get("/v1/messages/batches", params={"limit": 2, "before_id": ids[1]}).json()
    assert [b["id"] for b in page["data"]] == [ids[3], ids[2]] and page["has_more"] is True
    assert [b.id for b in sdk.messages.batches.list(limit=2)] == ids[::-1]   # the SDK's auto-pagination
    assert http.get("/v1/messages/batches").json()["data"][0]["id"] == ids[4]
    for bad in ({"limit": 0}, {"limit": 1001}, {"limit": "x"}):
        reply = http.get("/v1/messages/batches", params=bad)
        assert reply.status_code == 400 and "limit" in reply.json()["error"]["message"]


def test_delete_only_once_ended(emu, sdk):
    emu.config.processing_seconds = 30
    batch = sdk.messages.batches.create(requests=requests_for(2))
    with pytest.raises(anthropic.BadRequestError):
        sdk.messages.batches.delete(batch.id)
    emu.config.processing_seconds = 0
    deleted = sdk.messages.batches.delete(batch.id)
    assert deleted.id == batch.id and deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        sdk.messages.batches.retrieve(batch.id)
    assert batch.id not in [b.id for b in sdk.messages.batches.list()]


def test_archived_results_are_gone(emu, sdk, http):
    emu.config.archive_after_seconds = 0.05
    batch = sdk.messages.batches.create(requests=requests_for(2))
    url = wait_ended(sdk, batch.id).results_url
    time.sleep(0.06)
    assert sdk.messages.batches.retrieve(batch.id).archived_at is not None
    reply = http.get(url)
    assert reply.status_code == 404 and reply.json()["error"]["type"] == "not_found_error"


def test_results_before_the_end_are_refused(emu, http):
    emu.config.processing_seconds = 30
    batch = http.post("/v1/messages/batches", json={"requests": requests_for(1)}).json()
    assert http.get(f"/v1/messages/batches/{batch['id']}/results").status_code == 400
    assert http.get("/v1/messages/batches/msgbatch_nope").status_code == 404


# ------------------------------------------------------------------------------------ messages


def test_messages_and_count_tokens(emu, sdk):
    p = params("Is this review positive? Great product, fast shipping.", OPUS)
    raw = sdk.messages.with_raw_response.create(**p)
    message = raw.parse()
    assert raw.headers["request-id"].startswith("req_")
    for kind in ("requests", "input-tokens", "output-tokens", "tokens"):
        for part in ("limit", "remaining", "reset"):
            assert f"anthropic-ratelimit-{kind}-{part}" in raw.headers
    assert raw.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    assert message.content[0].text == reply_for(p)["content"][0]["text"]
    assert message.usage.service_tier == "standard" and message.model == OPUS
    counted = sdk.messages.count_tokens(model=OPUS, messages=p["messages"])
    assert counted.input_tokens == message.usage.input_tokens == count_tokens(p)
    # "Is this review positive? Great product, fast shipping.": words by 4 letters, punctuation 1 each
    assert count_tokens(p) == 1 + 1 + 2 + 2 + 1 + 2 + 2 + 1 + 1 + 2 + 1 == 16
    assert emu.stats.messages_calls == 1 and emu.stats.count_tokens_calls == 1


def test_tokens_scale_for_the_new_tokenizer():
    text = "x" * 400                                             # 100 tokens
    assert count_tokens(params(text, OPUS)) == 100
    assert count_tokens(params(text, "claude-opus-4-7")) == 130
    system = {"system": "y" * 40, "tools": [{"name": "t", "input_schema": {"type": "object"}}]}
    tools_json = replies.canonical(system["tools"])
    assert count_tokens(params(text, OPUS, **system)) == 100 + 10 + replies.tokens(tools_json)
    # words, not characters: the same 8 characters count differently
    assert [replies.tokens(t) for t in ("abcdefgh", "ab cd ef", "a,b.c;d!", "éèêëàâîï", "12345678")] == [2, 3, 8, 8, 3]


def test_wrap_messages_like_a_gateway(emu, http):
    emu.config.wrap_messages = True
    body = http.post("/v1/messages", json=params("hi")).json()
    assert body["code"] == 200 and body["data"]["type"] == "message"
    assert body["data"]["content"][0]["text"].startswith("Reply to: hi")


def test_determinism(emu, sdk):
    p = params("the same row, twice")
    assert reply_for(p) == reply_for(json.loads(json.dumps(p)))
    first, second = sdk.messages.create(**p), sdk.messages.create(**p)
    assert first.content == second.content and first.usage == second.usage
    other = sdk.messages.create(**params("another row"))
    assert other.content[0].text != first.content[0].text


def test_max_tokens_stop_sequences_and_prefill(emu, sdk):
    cut = sdk.messages.create(**{**params("a fairly long question about billing and refunds"), "max_tokens": 3})
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens <= 3
    assert cut.content[0].text == "Reply to"                      # Repl|y|to: 3 tokens
    stopped = sdk.messages.create(**params("hello world", stop_sequences=["world"]))
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "world"
    assert stopped.content[0].text == "Reply to: hello "
    prefilled = sdk.messages.create(model=HAIKU, max_tokens=100, messages=[
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "Reply to:"}])
    assert prefilled.content[0].text.startswith(" hello #")


def test_structured_output_fits_its_schema(emu, sdk):
    # constraints structured output refuses travel as a description note, which the model follows
    schema = {"type": "object", "additionalProperties": False,
              "required": ["category", "urgency", "score", "tags", "flag", "owner"],
              "properties": {
                  "category": {"type": "string", "enum": ["billing", "bug", "other"]},
                  "urgency": {"type": "integer", "description": "1 to 5\n\n{minimum: 1, maximum: 5}"},
                  "score": {"type": "number", "description": "{minimum: 0, maximum: 1}"},
                  "tags": {"type": "array", "items": {"type": "string"},
                           "description": "{maxItems: 2, uniqueItems: true}"},
                  "flag": {"type": "boolean"},
                  "owner": {"type": "object", "required": ["name"], "additionalProperties": False,
                            "properties": {"name": {"type": "string", "description": "{maxLength: 6}"}}}}}
    full = json.loads(json.dumps(schema))
    full["properties"]["urgency"].update(minimum=1, maximum=5)
    full["properties"]["score"].update(minimum=0, maximum=1)
    full["properties"]["tags"].update(maxItems=2, uniqueItems=True)
    full["properties"]["owner"]["properties"]["name"]["maxLength"] = 6
    texts = set()
    for i in range(15):
        message = sdk.messages.create(**params(f"ticket {i}", output_config={
            "format": {"type": "json_schema", "schema": schema}}))
        assert message.stop_reason == "end_turn"
        value = json.loads(message.content[0].text)
        jsonschema.validate(value, full)
        texts.add(message.content[0].text)
    assert len(texts) > 5
    # explicit unsupported keywords are refused, naming the keyword
    with pytest.raises(anthropic.BadRequestError, match="urgency.minimum"):
        sdk.messages.create(**params("x", output_config={"format": {"type": "json_schema", "schema": full}}))


def test_schema_values_respect_constraints():
    schema = {"type": "object", "required": ["a", "b", "c", "d", "e", "f", "g"], "$defs": {
        "leaf": {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer", "minimum": -3,
                                                                          "exclusiveMaximum": 0}}}},
        "properties": {
            "a": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 2, "maxItems": 3,
                  "uniqueItems": True},
            "b": {"type": "string", "minLength": 12, "maxLength": 14},
            "c": {"anyOf": [{"type": "null"}, {"type": "number", "exclusiveMinimum": 10, "maximum": 11}]},
            "d": {"$ref": "#/$defs/leaf"},
            "e": {"type": ["string", "null"], "format": "date"},
            "f": {"type": "array", "items": {"$ref": "#/$defs/leaf"}, "minItems": 1},
            "g": {"const": 7}}}
    for seed in range(60):
        jsonschema.validate(schema_value(schema, f"seed-{seed}"), schema)


def test_forced_tool_use(emu, sdk):
    tool = {"name": "record", "description": "Record the labels.", "input_schema": {
        "type": "object", "required": ["label", "confidence"],
        "properties": {"label": {"type": "string", "enum": ["positive", "negative"]},
                       "confidence": {"type": "number", "minimum": 0, "maximum": 1}}}}
    for choice in ({"type": "tool", "name": "record"}, {"type": "any"}):
        message = sdk.messages.create(**params("great!", OPUS, tools=[tool], tool_choice=choice))
        assert message.stop_reason == "tool_use"
        block = message.content[-1]
        assert block.type == "tool_use" and block.name == "record" and block.id.startswith("toolu_")
        jsonschema.validate(block.input, tool["input_schema"])
        assert message.usage.output_tokens == replies.tokens(replies.canonical(block.input))
    # a model that refuses forced tool use answers 400, naming tool_choice
    with pytest.raises(anthropic.BadRequestError, match="tool_choice"):
        sdk.messages.create(**params("x", "claude-opus-5-5", tools=[tool], tool_choice={"type": "tool", "name": "record"}))


def test_thinking_blocks(emu, sdk):
    on = sdk.messages.create(**params("think", OPUS, max_tokens=3000,
                                      thinking={"type": "enabled", "budget_tokens": 1024}))
    assert [b.type for b in on.content] == ["thinking", "text"] and on.content[0].signature
    assert on.usage.output_tokens == replies.tokens(on.content[0].thinking) + replies.tokens(on.content[1].text)
    assert [b.type for b in sdk.messages.create(**params("no thinking", OPUS)).content] == ["text"]
    adaptive = sdk.messages.create(**params("default", "claude-haiku-5-5"))       # adaptive by default
    assert adaptive.content[0].type == "thinking"


# ------------------------------------------------------------------------------------ caching


def cached(text_chars: int, i: int, model: str = OPUS, ttl=None) -> dict:
    control = {"type": "ephemeral", **({"ttl": ttl} if ttl else {})}
    return params(f"row {i}", model, system=[{"type": "text", "text": "g" * text_chars, "cache_control": control}])


def test_cache_write_then_reads_in_a_batch(emu, sdk):
    reqs = [{"custom_id": f"c{i}", "params": cached(6000, i)} for i in range(6)]   # 1500 tokens >= 1024
    got = results(sdk, sdk.messages.batches.create(requests=reqs).id)
    usage = {cid: r.result.message.usage for cid, r in got.items()}
    assert usage["c0"].cache_creation_input_tokens == 1500 and usage["c0"].cache_read_input_tokens == 0
    assert usage["c0"].cache_creation.ephemeral_5m_input_tokens == 1500
    for i in range(1, 6):
        assert usage[f"c{i}"].cache_read_input_tokens == 1500 and usage[f"c{i}"].cache_creation_input_tokens == 0
    for i in range(6):
        total = count_tokens(reqs[i]["params"])
        u = usage[f"c{i}"]
        assert u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens == total
    # the next request (here on /v1/messages) reads the same entry
    assert sdk.messages.create(**cached(6000, 99)).usage.cache_read_input_tokens == 1500


def test_cold_batches_read_only_writes_of_batches_that_ended(emu, sdk, monkeypatch):
    """cold_batches: the items of one batch never read each other's writes, nor those of a batch still
    running when theirs was created; a batch created after the writing batch ended reads, within the TTL."""
    emu.config.cold_batches, emu.config.processing_seconds = True, 0.3

    def usage(requests: list) -> dict:
        batch_id = sdk.messages.batches.create(requests=requests).id
        wait_ended(sdk, batch_id)
        return {cid: r.result.message.usage for cid, r in results(sdk, batch_id).items()}

    first = sdk.messages.batches.create(requests=[{"custom_id": f"a{i}", "params": cached(6000, i)} for i in range(4)])
    during = usage([{"custom_id": "b0", "params": cached(6000, 10)}])     # created while `first` ran
    wait_ended(sdk, first.id)
    written = {cid: r.result.message.usage for cid, r in results(sdk, first.id).items()}
    assert all(u.cache_creation_input_tokens == 1500 and u.cache_read_input_tokens == 0 for u in written.values())
    assert during["b0"].cache_creation_input_tokens == 1500 and during["b0"].cache_read_input_tokens == 0
    after = usage([{"custom_id": f"c{i}", "params": cached(6000, 20 + i)} for i in range(3)])
    assert all(u.cache_read_input_tokens == 1500 and u.cache_creation_input_tokens == 0 for u in after.values())
    # past the 5-minute TTL the entry is gone: the next batch writes again
    monkeypatch.setattr(emu, "clock", lambda: time.time() + 301)
    assert usage([{"custom_id": "d0", "params": cached(6000, 30)}])["d0"].cache_creation_input_tokens == 1500
    # without the flag (the default) the items of one batch read the first one's write
    emu.config.cold_batches = False
    warm = usage([{"custom_id": f"e{i}", "params": cached(7000, i)} for i in range(4)])
    assert sorted(u.cache_read_input_tokens for u in warm.values()) == [0, 1750, 1750, 1750]


def test_cache_minimum_per_model_and_ttl(emu, sdk):
    small = sdk.messages.create(**cached(3000, 1))              # 750 tokens < 1024: not cached, no error
    assert small.usage.cache_creation_input_tokens == 0 and small.usage.cache_read_input_tokens == 0
    assert small.usage.input_tokens == count_tokens(cached(3000, 1))
    haiku = sdk.messages.create(**cached(6000, 1, HAIKU))       # 1500 < Haiku 4.5's 4096
    assert haiku.usage.cache_creation_input_tokens == 0
    big = sdk.messages.create(**cached(20000, 1, HAIKU, ttl="1h"))
    assert big.usage.cache_creation_input_tokens == 5000
    assert big.usage.cache_creation.ephemeral_1h_input_tokens == 5000
    assert big.usage.cache_creation.ephemeral_5m_input_tokens == 0


# ------------------------------------------------------------------------------------ validation


def error_of(reply: httpx.Response) -> str:
    body = reply.json()
    assert body["type"] == "error" and body["request_id"] == reply.headers["request-id"]
    return body["error"]["message"]


@pytest.mark.parametrize("mutate, status, field", [
    (lambda r: r[1].update(custom_id="bad id!"), 400, "requests.1.custom_id"),
    (lambda r: r[1].update(custom_id="x" * 65), 400, "requests.1.custom_id"),
    (lambda r: r[2].update(custom_id=r[0]["custom_id"]), 400, "requests.2.custom_id"),
    (lambda r: r[1]["params"].update(stream=True), 400, "requests.1.params.stream"),
    (lambda r: r[1]["params"].update(temperatur=0.5), 400, "requests.1.params.temperatur"),
    (lambda r: r[0]["params"].update(max_tokens=0), 400, "requests.0.params.max_tokens"),
    (lambda r: r[0]["params"].pop("max_tokens"), 400, "requests.0.params.max_tokens"),
    (lambda r: r[0]["params"].update(model=3), 400, "requests.0.params.model"),
    (lambda r: r[0]["params"].update(messages=[]), 400, "requests.0.params.messages"),
    (lambda r: r[0]["params"]["messages"][0].update(role="system"), 400, "requests.0.params.messages.0.role"),
    (lambda r: r[0].update(extra=1), 400, "requests.0.extra"),
    (lambda r: r.clear(), 400, "requests"),
])
def test_create_validation_names_the_field(emu, http, mutate, status, field):
    reqs = requests_for(3)
    mutate(reqs)
    reply = http.post("/v1/messages/batches", json={"requests": reqs})
    assert reply.status_code == status
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert error_of(reply).startswith(field + ":")
    assert emu.stats.batches_created == 0 and emu.stats.create_calls == 1


def test_size_limits_give_413(emu, http):
    emu.config.max_requests = 5
    reply = http.post("/v1/messages/batches", json={"requests": requests_for(6)})
    assert reply.status_code == 413 and reply.json()["error"]["type"] == "request_too_large"
    emu.config.max_requests, emu.config.max_body_bytes = 100_000, 1000
    reply = http.post("/v1/messages/batches", json={"requests": requests_for(20)})
    assert reply.status_code == 413 and reply.json()["error"]["type"] == "request_too_large"
    assert emu.stats.batches_created == 0


def test_no_validate_still_parses(emu, http):
    emu.config.validate = False
    reqs = requests_for(2)
    reqs[0]["params"]["unknown_key"] = 1
    assert http.post("/v1/messages/batches", json={"requests": reqs}).status_code == 200


def test_allowed_params_are_the_sdks():
    from anthropic.types.message_create_params import MessageCreateParamsNonStreaming
    assert set(MessageCreateParamsNonStreaming.__annotations__) - {"stream"} <= MESSAGE_PARAM_KEYS


def test_refused_params_end_errored_in_a_batch_and_400_on_messages(emu, sdk, http):
    reqs = [{"custom_id": "temp", "params": params("a", "claude-haiku-5-5", temperature=0.2)},
            {"custom_id": "unknown", "params": params("b", "claude-nonexistent-9")},
            {"custom_id": "empty", "params": params("")},
            {"custom_id": "fine", "params": params("c")}]
    got = results(sdk, sdk.messages.batches.create(requests=reqs).id)
    assert got["temp"].result.type == "errored"
    assert got["temp"].result.error.error.type == "invalid_request_error"
    assert got["temp"].result.error.error.message.startswith("temperature")
    assert got["unknown"].result.error.error.type == "not_found_error"
    assert got["empty"].result.error.error.type == "invalid_request_error"
    assert got["fine"].result.type == "succeeded"
    # the SDK sends API version 2026-10-21, which refuses sampling params on every model
    sonnet = results(sdk, sdk.messages.batches.create(requests=[
        {"custom_id": "t", "params": params("a", OPUS, temperature=0.2)}]).id)
    assert sonnet["t"].result.type == "errored" and "2026-10-21" in sonnet["t"].result.error.error.message
    old = http.post("/v1/messages", json=params("a", OPUS, temperature=0.2))       # 2023-06-01
    assert old.status_code == 200
    refused = http.post("/v1/messages", json=params("a", OPUS, temperature=0.2),
                        headers={"anthropic-version": "2026-10-21"})
    assert refused.status_code == 400 and error_of(refused).startswith("temperature")
    missing = http.post("/v1/messages", json=params("a", "claude-nonexistent-9"))
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    emu.config.extra_models = ("claude-nonexistent-9",)
    assert http.post("/v1/messages", json=params("a", "claude-nonexistent-9")).status_code == 200


def test_auth_and_version(emu, base_url, http):
    emu.config.api_key = "sk-right"
    wrong = anthropic.Anthropic(base_url=base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        wrong.messages.batches.list()
    right = anthropic.Anthropic(base_url=base_url, api_key="sk-right", max_retries=0)   # Bearer
    assert right.messages.batches.list().data == []
    reply = http.get("/v1/messages/batches", headers={"x-api-key": "sk-right"})
    assert reply.status_code == 200
    reply = httpx.get(f"{base_url}/v1/messages/batches", headers={"x-api-key": "sk-right"})
    assert reply.status_code == 400 and "anthropic-version" in error_of(reply)


def test_gateway_prefix(emu, base_url):
    sdk = anthropic.Anthropic(base_url=base_url + "/anthropic", api_key="k", max_retries=0)
    batch = sdk.messages.batches.create(requests=requests_for(2))
    assert wait_ended(sdk, batch.id).results_url.startswith(base_url + "/anthropic/v1/messages/batches/")
    assert len(results(sdk, batch.id)) == 2


# ------------------------------------------------------------------------------------ faults


def test_injected_faults_of_every_kind(emu, http):
    emu.config.fault_rate = 1.0
    seen = set()
    for _ in range(60):
        try:
            reply = http.get("/v1/messages/batches")
        except httpx.RemoteProtocolError:
            seen.add("drop")
            continue
        seen.add(reply.status_code)
        error = reply.json()["error"]["type"]
        assert (reply.status_code, error) in {(429, "rate_limit_error"), (500, "api_error"), (529, "overloaded_error")}
        if reply.status_code == 429:
            assert float(reply.headers["retry-after"]) == 0.01 and reply.headers["retry-after-ms"] == "10"
    assert seen == {429, 500, 529, "drop"}
    assert set(emu.stats.faults) == {"429", "500", "529", "drop"} and sum(emu.stats.faults.values()) == 60


def test_create_faults_429_529_never_create_500_and_drop_do(emu, http):
    emu.config.fault_rate = 1.0
    outcomes = []
    for i in range(40):
        try:
            outcomes.append(http.post("/v1/messages/batches", json={"requests": requests_for(1)}).status_code)
        except httpx.RemoteProtocolError:
            outcomes.append("drop")
    created = sum(1 for o in outcomes if o in (500, "drop"))
    assert {429, 529, 500, "drop"} <= set(outcomes)
    assert emu.stats.batches_created == created and emu.stats.create_calls == 40
    emu.config.fault_rate = 0.0
    assert len(emu.batch_ids()) == created


def test_drop_after_create_then_the_batch_is_listed(emu, sdk):
    emu.config.drop_after_create = 1
    with pytest.raises(anthropic.APIConnectionError):
        sdk.messages.batches.create(requests=requests_for(3, prefix="lost"))
    assert emu.config.drop_after_create == 0
    listed = list(sdk.messages.batches.list())
    assert len(listed) == 1 and listed[0].request_counts.processing + listed[0].request_counts.succeeded == 3
    assert emu.stats.faults["drop_after_create"] == 1 and emu.stats.batches_created == 1
    sdk.messages.batches.create(requests=requests_for(3))          # the next create is answered
    assert emu.stats.batches_created == 2


def test_truncated_downloads(emu, sdk, http):
    batch = sdk.messages.batches.create(requests=requests_for(50))
    url = wait_ended(sdk, batch.id).results_url
    emu.config.truncate_rate = 1.0
    kinds = set()
    for _ in range(20):
        lines = []
        try:
            with http.stream("GET", url) as reply:
                assert reply.status_code == 200
                for line in reply.iter_lines():
                    if line:
                        lines.append(json.loads(line))
        except (httpx.RemoteProtocolError, json.JSONDecodeError):
            kinds.add("drop")
            continue
        assert len(lines) < 50                                     # ended cleanly, but short
        kinds.add("short")
    assert kinds == {"drop", "short"}
    emu.config.truncate_rate = 0.0
    assert len(http.get(url).text.splitlines()) == 50
    assert emu.stats.faults["truncate_drop"] + emu.stats.faults["truncate_short"] == 20


def test_rpm_limit_gives_429_with_retry_after(emu, http):
    emu.config.rpm, emu.config.rate_window = 2, 0.6      # a bucket of 2, refilling one every 0.3 s
    assert [http.post("/v1/messages", json=params("hi")).status_code for _ in range(2)] == [200, 200]
    limited = http.post("/v1/messages", json=params("hi"))
    assert limited.status_code == 429 and limited.json()["error"]["type"] == "rate_limit_error"
    assert 0 < float(limited.headers["retry-after"]) <= 0.3 and int(limited.headers["retry-after-ms"]) <= 300
    assert limited.headers["anthropic-ratelimit-requests-limit"] == "2"
    assert limited.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert emu.stats.messages_429 == 1 and emu.stats.messages_calls == 3
    time.sleep(float(limited.headers["retry-after"]) + 0.01)
    assert http.post("/v1/messages", json=params("hi")).status_code == 200
    emu.config.rpm, emu.config.input_tpm, emu.config.rate_window = None, 10, 10.0   # refills 1 a second
    assert http.post("/v1/messages", json=params("x" * 36)).status_code == 200     # 9 tokens
    assert http.post("/v1/messages", json=params("x" * 8)).status_code == 429      # 9 + 2 > 10


# ------------------------------------------------------------------------------------ in process


def test_in_process_sync_transport(emu):
    with httpx.Client(base_url="http://emulator.invalid", transport=emu.sync_transport(),
                      headers={"anthropic-version": "2023-06-01", "x-api-key": "k"}) as client:
        batch = client.post("/v1/messages/batches", json={"requests": requests_for(5)}).json()
        got = client.get(f"/v1/messages/batches/{batch['id']}").json()
        assert got["results_url"] == f"http://emulator.invalid/v1/messages/batches/{batch['id']}/results"
        with client.stream("GET", got["results_url"]) as reply:
            lines = [json.loads(line) for line in reply.iter_lines() if line]
        assert sorted(line["custom_id"] for line in lines) == [f"row-{i}" for i in range(5)]
        emu.config.drop_after_create = 1
        with pytest.raises(httpx.TransportError):
            client.post("/v1/messages/batches", json={"requests": requests_for(1)})
        assert emu.stats.batches_created == 2
        emu.config.truncate_rate = 1.0
        kinds = set()
        for _ in range(10):
            try:
                with client.stream("GET", got["results_url"]) as reply:
                    kinds.add(len([line for line in reply.iter_lines() if line]) < 5 and "short")
            except httpx.TransportError:
                kinds.add("drop")
        assert kinds == {"short", "drop"}


def test_in_process_async_asgi_transport(emu):
    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emu), base_url="http://emu",
                                     headers={"anthropic-version": "2023-06-01"}) as client:
            reply = await client.post("/v1/messages", json=params("async hello"))
            assert reply.json()["content"][0]["text"].startswith("Reply to: async hello")
            emu.config.drop_after_create = 1
            with pytest.raises(httpx.TransportError):
                await client.post("/v1/messages/batches", json={"requests": requests_for(1)})
    asyncio.run(main())
    assert emu.stats.batches_created == 1


def test_control_endpoints(emu, base_url, http):
    http.post("/v1/messages", json=params("hi"))
    stats = httpx.get(f"{base_url}/_emulator/stats").json()
    assert stats["messages_calls"] == 1 and stats["status_counts"] == {"200": 1}
    reply = httpx.post(f"{base_url}/_emulator/config", json={"processing_seconds": 7, "rpm": 3,
                                                             "extra_models": ["m-1"]})
    assert reply.status_code == 200 and reply.json()["processing_seconds"] == 7
    assert emu.config.processing_seconds == 7 and emu.config.rpm == 3 and emu.config.extra_models == ("m-1",)
    bad = httpx.post(f"{base_url}/_emulator/config", json={"nope": 1})
    assert bad.status_code == 400 and "nope" in bad.json()["error"]["message"]
    assert httpx.post(f"{base_url}/_emulator/config", json={"rpm": "many"}).status_code == 400
    assert emu.config.rpm == 3
    assert httpx.post(f"{base_url}/_emulator/reset").json() == {"ok": True}
    assert emu.stats.messages_calls == 0


def test_cli_command_help():
    from click.testing import CliRunner
    from batchrun.cli.emulator_cmd import emulator
    result = CliRunner().invoke(emulator, ["--help"])
    assert result.exit_code == 0
    for option in ("--port", "--processing-seconds", "--fault-rate", "--truncate-rate", "--wrap-messages",
                   "--no-validate", "--seed", "--rpm", "--api-key"):
        assert option in result.output
    bad = CliRunner().invoke(emulator, ["--fault-rate", "2"])
    assert bad.exit_code == 2
