"""Anthropic's Messages API over real HTTP with the official `anthropic` client.

The same engine core as the OpenAI route: the built-in model, grammars that
hold tool calls to their schemas (checked with `jsonschema`), and
Anthropic's error shape and `x-api-key`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2 as httpx
import jsonschema
import pytest

from engine.serving.messages_api import EventWriter
from engine.tools.formats import ToolFormat
from engine.tools.parse import StreamParser
from tests.engine_proc import EngineProc, running_engine
from tests.test_tool_calling import WRITE

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"name": "get_weather", "description": "Weather for a city", "input_schema": WEATHER}
]
# Current clients no longer take `temperature`; the engine still reads it from the body.
GREEDY = {"temperature": 0}
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]


@pytest.fixture(scope="module")
def engine() -> Iterator[EngineProc]:
    with running_engine("--ctx", "2048", "--threads", "2") as proc:
        yield proc


@pytest.fixture(scope="module")
def client(engine: EngineProc) -> anthropic.Anthropic:
    # The official client sends its key as x-api-key.
    return anthropic.Anthropic(base_url=engine.base_url, api_key=engine.key, max_retries=0)


def test_a_plain_message_with_system_blocks(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(
        model="m",
        max_tokens=16,
        system=[{"type": "text", "text": "You are terse."}],
        messages=[{"role": "user", "content": "Say hello."}],
        extra_body=GREEDY,
    )
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.content[0].type == "text" and msg.content[0].text
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage.input_tokens > 0 and 0 < msg.usage.output_tokens <= 16


def test_max_tokens_and_stop_sequences_give_their_stop_reasons(client: anthropic.Anthropic) -> None:
    cut = client.messages.create(
        model="m", max_tokens=2, messages=[{"role": "user", "content": "Count to ten."}]
    )
    assert cut.stop_reason == "max_tokens"
    first = client.messages.create(
        model="m",
        max_tokens=40,
        extra_body=GREEDY,
        messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
    )
    text = first.content[0].text  # type: ignore[union-attr]
    stop = next(ch for ch in text if ch.isdigit() and ch not in "01")
    stopped = client.messages.create(
        model="m",
        max_tokens=40,
        extra_body=GREEDY,
        stop_sequences=[stop],
        messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
    )
    assert stopped.stop_reason == "stop_sequence"
    assert stopped.stop_sequence == stop


@pytest.mark.parametrize(
    "tool_choice",
    [{"type": "tool", "name": "get_weather"}, {"type": "any", "disable_parallel_tool_use": True}],
)
def test_tool_use_whole_and_streamed(client: anthropic.Anthropic, tool_choice: Any) -> None:
    fields: dict[str, Any] = {
        "model": "m",
        "max_tokens": 96,
        "extra_body": GREEDY,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": tool_choice,
    }
    msg = client.messages.create(**fields)
    assert msg.stop_reason == "tool_use"
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and uses[0].id.startswith("toolu_")
    jsonschema.validate(uses[0].input, WEATHER)

    events = []
    with client.messages.stream(**fields) as stream:
        for event in stream:
            events.append(event.type)
        final = stream.get_final_message()
    streamed = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in streamed] == [(b.name, b.input) for b in uses]
    assert "input_json" in events  # the client's event for input_json_delta
    assert events[-1] == "message_stop"


def test_tool_input_streams_in_pieces_as_it_is_written(client: anthropic.Anthropic) -> None:
    write = WRITE  # a long string argument, held to 120-200 characters
    pieces: list[str] = []
    events: list[str] = []
    with client.messages.stream(
        model="m",
        max_tokens=300,
        extra_body=GREEDY,
        messages=[{"role": "user", "content": "Write a poem about the sea to sea.txt."}],
        tools=[{"name": "write_file", "description": "Writes a text file", "input_schema": write}],
        tool_choice={"type": "tool", "name": "write_file"},
    ) as stream:
        for event in stream:
            events.append(event.type)
            if event.type == "input_json":
                pieces.append(event.partial_json)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    (use,) = [b for b in final.content if b.type == "tool_use"]
    jsonschema.validate(use.input, write)
    # The pieces join into the input, and came as the model wrote it.
    assert json.loads("".join(pieces)) == use.input
    assert len(pieces) > 20
    # One tool_use block: opened before its pieces, closed after them.
    first, last = events.index("input_json"), len(events) - 1 - events[::-1].index("input_json")
    assert "content_block_start" in events[:first]
    assert "content_block_stop" in events[last:]


def test_a_tool_use_block_opens_at_the_name_and_a_cut_off_one_is_closed_at_the_end() -> None:
    fmt = ToolFormat("hermes", ("<tool_call>",), True)
    parser = StreamParser(fmt, {"get_weather": WEATHER}, new_id=lambda: "toolu_1", grammar=True)
    writer = EventWriter()
    early = writer.feed(parser.feed('Sure.<tool_call>\n{"name": "get_weather", "arguments": {"ci'))
    assert [(name, e.get("index")) for name, e in early] == [
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
    ]
    assert early[3][1]["content_block"] == {
        "type": "tool_use",
        "id": "toolu_1",
        "name": "get_weather",
        "input": {},
    }
    assert early[4][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"ci'}
    # Cut off by max_tokens: the block still closes, and nothing of the call becomes text.
    rest = writer.feed(parser.feed('ty": "Pa') + parser.finish()) + writer.finish()
    assert [name for name, _e in rest] == ["content_block_delta", "content_block_stop"]
    assert parser.calls == []


def test_raw_stream_has_ping_and_input_json_deltas(engine: EngineProc) -> None:
    body = {
        "model": "m",
        "max_tokens": 96,
        "temperature": 0,
        "stream": True,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    with httpx.Client(base_url=engine.base_url, timeout=120) as c:
        r = c.post("/v1/messages", json=body, headers={"x-api-key": engine.key})
    names = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    assert names[:2] == ["message_start", "ping"]
    assert "content_block_start" in names and "content_block_stop" in names
    assert '"input_json_delta"' in r.text
    assert names[-2:] == ["message_delta", "message_stop"]


def test_a_tool_result_turn_is_answered(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(
        model="m",
        max_tokens=32,
        extra_body=GREEDY,
        tools=TOOLS,
        messages=[
            *ASK,
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me check."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"city": "Paris", "days": 3},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 24 C."}
                ],
            },
        ],
    )
    assert msg.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert msg.content


def test_tool_choice_none_makes_no_call(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(
        model="m",
        max_tokens=32,
        extra_body=GREEDY,
        tools=TOOLS,
        tool_choice={"type": "none"},
        messages=[{"role": "user", "content": "Repeat exactly this text: <tool_call>"}],
    )
    assert all(b.type == "text" for b in msg.content)
    assert msg.stop_reason != "tool_use"


def test_count_tokens_grows_with_the_prompt(client: anthropic.Anthropic) -> None:
    short = client.messages.count_tokens(model="m", messages=ASK)
    longer = client.messages.count_tokens(model="m", messages=ASK, tools=TOOLS, system="Be brief.")
    assert 0 < short.input_tokens < longer.input_tokens
    msg = client.messages.create(model="m", max_tokens=1, messages=ASK)
    assert msg.usage.input_tokens == short.input_tokens


def test_errors_come_in_anthropics_shape(engine: EngineProc, client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model="m",
            max_tokens=8,
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "tool", "name": "nope"},
        )
    assert info.value.body["type"] == "error"  # type: ignore[index]
    assert info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "nope" in info.value.body["error"]["message"]  # type: ignore[index]
    with httpx.Client(base_url=engine.base_url, timeout=30) as c:
        r = c.post("/v1/messages", json={"messages": ASK}, headers={"x-api-key": engine.key})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        r = c.post("/v1/messages", json={"max_tokens": 5, "messages": ASK})
        assert r.status_code == 401
        assert r.json() == {
            "type": "error",
            "error": {"type": "authentication_error", "message": r.json()["error"]["message"]},
        }
        image = [{"role": "user", "content": [{"type": "image", "source": {}}]}]
        r = c.post(
            "/v1/messages",
            json={"max_tokens": 5, "messages": image},
            headers={"x-api-key": engine.key},
        )
        assert r.status_code == 400 and "image" in r.json()["error"]["message"]
