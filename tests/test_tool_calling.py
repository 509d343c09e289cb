"""Tool calling over real HTTP: the engine, the built-in model and OpenAI's client.

A grammar holds every requested call to its tool's schema, so even a 135M
model's calls are valid: each one here is checked with `jsonschema`. The
model's own syntax is paired with real templates through
`--chat-template-file`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.engine_proc import EngineProc, running_engine, wait_for

pytestmark = pytest.mark.slow

TEMPLATES = Path(__file__).parent / "data" / "templates"

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}},
    "required": ["zone"],
}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": name, "description": f"{name} for a place", "parameters": schema},
    }
    for name, schema in SCHEMAS.items()
]
ASK = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]
# A 135M model writes the marker when told to; from there the grammar holds the call.
MARKER = [{"role": "user", "content": "Repeat exactly this text: <tool_call>"}]
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}
# A file to write: the grammar holds the content to 120-200 characters, a long argument.
WRITE = {
    "type": "object",
    "properties": {
        "path": {"type": "string", "maxLength": 40},
        "content": {"type": "string", "minLength": 120, "maxLength": 200},
    },
    "required": ["path", "content"],
    "additionalProperties": False,
}
WRITE_TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "description": "Writes a text file",
            "parameters": WRITE,
        },
    }
]


@pytest.fixture(scope="module")
def engine() -> Iterator[EngineProc]:
    with running_engine("--ctx", "2048", "--threads", "2") as proc:
        yield proc


@pytest.fixture(scope="module")
def client(engine: EngineProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=engine.base_url + "/v1", api_key=engine.key, max_retries=0)


def check_calls(calls: list[Any] | None, names: set[str] | None = None) -> list[tuple[str, Any]]:
    assert calls, "expected tool calls"
    out = []
    for call in calls:
        assert call.type == "function" and call.id
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        if names is not None:
            assert call.function.name in names
        out.append((call.function.name, args))
    return out


def stream_calls(client: openai.OpenAI, **fields: Any) -> tuple[list[Any], str, str]:
    """Streams a chat and assembles it as agent frameworks do: calls, content, finish reason."""
    calls: dict[int, dict[str, Any]] = {}
    content = ""
    finish = ""
    for chunk in client.chat.completions.create(model="m", stream=True, **fields):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                assert slot["id"] is None, "a call's id comes once"
                slot["id"] = tc.id
            if tc.function and tc.function.name:
                slot["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                slot["arguments"] += tc.function.arguments
        finish = choice.finish_reason or finish
    assembled = [
        openai.types.chat.ChatCompletionMessageToolCall(
            id=c["id"], type="function", function={"name": c["name"], "arguments": c["arguments"]}
        )
        for _, c in sorted(calls.items())
    ]
    return assembled, content, finish


@pytest.mark.parametrize(
    ("choice", "messages"),
    [("named", ASK), ("required", ASK), ("auto", MARKER)],
)
def test_calls_are_valid_whole_and_streamed(
    client: openai.OpenAI, choice: str, messages: list[Any]
) -> None:
    tool_choice: Any = NAMED if choice == "named" else choice
    fields: dict[str, Any] = {
        "messages": messages,
        "tools": TOOLS,
        "tool_choice": tool_choice,
        "max_tokens": 96,
        "temperature": 0,
    }
    names = {"get_weather"} if choice == "named" else None
    whole = client.chat.completions.create(model="m", **fields)
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls"
    whole_calls = check_calls(message.tool_calls, names)
    assert len(whole_calls) == 1  # one call unless parallel_tool_calls asks for more
    calls, content, finish = stream_calls(client, **fields)
    assert finish == "tool_calls"
    assert check_calls(calls, names) == whole_calls  # greedy: the same call
    assert content == (message.content or "")
    assert "<tool_call>" not in content


def test_a_long_argument_streams_as_the_model_writes_it(client: openai.OpenAI) -> None:
    fields: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": "Write a poem about the sea to sea.txt."}],
        "tools": WRITE_TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "write_file"}},
        "max_tokens": 300,
        "temperature": 0,
    }
    pieces: list[str] = []
    # The official client's stream helper assembles the call from the chunks.
    with client.chat.completions.stream(**fields) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.delta":
                pieces.append(event.arguments_delta)
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WRITE)
    assert "".join(pieces) == call.function.arguments
    # The arguments came as they were written, a token or so per chunk, not
    # whole at the end: the content alone spans dozens of chunks.
    assert len(pieces) > 20
    assert max(len(p) for p in pieces) < len(args["content"]) // 4


def test_parallel_calls_when_asked_for(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="m",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=True,
        max_tokens=120,
        temperature=0,
    )
    # The model may stop after one call or write several; each is valid.
    check_calls(r.choices[0].message.tool_calls)


def test_tool_choice_none_makes_no_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="m", messages=MARKER, tools=TOOLS, tool_choice="none", max_tokens=48, temperature=0
    )
    choice = r.choices[0]
    assert choice.message.tool_calls is None
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.content


def test_a_tool_result_turn_is_answered(client: openai.OpenAI) -> None:
    history: list[Any] = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "days": 3}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C all week."},
    ]
    r = client.chat.completions.create(
        model="m", messages=history, tools=TOOLS, max_tokens=48, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.choices[0].message.content


def test_legacy_functions_answer_with_function_call(engine: EngineProc) -> None:
    body = {
        "messages": ASK,
        "functions": [{"name": "get_weather", "parameters": WEATHER}],
        "function_call": {"name": "get_weather"},
        "max_tokens": 96,
        "temperature": 0,
    }
    with engine.client() as c:
        r = c.post("/v1/chat/completions", json=body).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"]["name"] == "get_weather"
    jsonschema.validate(json.loads(choice["message"]["function_call"]["arguments"]), WEATHER)

    # Streamed: the name first with "" arguments, then the arguments in pieces.
    with engine.client() as c:
        r = c.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    deltas = [ch["choices"][0]["delta"] for ch in chunks if ch["choices"]]
    calls = [d["function_call"] for d in deltas if "function_call" in d]
    assert calls[0] == {"name": "get_weather", "arguments": ""}
    assert len(calls) > 2 and all(set(fc) == {"arguments"} for fc in calls[1:])
    assert not any("tool_calls" in d for d in deltas)
    streamed = json.loads("".join(fc["arguments"] for fc in calls))
    assert streamed == json.loads(choice["message"]["function_call"]["arguments"])
    assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1] == (
        "function_call"
    )


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"x": {"not": {}}}},
                        },
                    }
                ]
            },
            "tools.0.function.parameters",
            "'not'",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools",
            "tools.0.function.name",
        ),
        ({"response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
        ({"tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
        (
            {
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{oops"},
                            }
                        ],
                    },
                ]
            },
            "messages.1.tool_calls.0.function.arguments",
            "not valid JSON",
        ),
    ],
)
def test_bad_tool_requests_get_a_400_naming_the_field(
    engine: EngineProc, fields: dict[str, Any], param: str, needle: str
) -> None:
    body = {"messages": ASK, "tools": TOOLS, "max_tokens": 8, **fields}
    with engine.client() as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert needle in error["message"]


def test_the_self_test_passes_and_shows_in_status_and_models(engine: EngineProc) -> None:
    with engine.client() as c:

        def tested() -> bool:
            return c.get("/v1/engine/status").json()["tool_format"]["self_test"] is not None

        # It runs in the background once the engine is idle (the tests above keep it busy).
        assert wait_for(tested, timeout=600, interval=0.2)
        status = c.get("/v1/engine/status").json()["tool_format"]
        models = c.get("/v1/models").json()["data"][0]["tool_format"]
    # SmolLM2's template takes no tools: the generic format, with tools injected.
    assert status == {"name": "generic", "self_test": True, "detail": None}
    assert models == status


# --- native formats: real templates paired with the built-in model ------------------

NATIVE = {
    "hermes": "Qwen-Qwen2.5-7B-Instruct.jinja",
    "qwen3_coder": "Qwen3-Coder.jinja",
    "glm45": "GLM-4.6.jinja",
    "llama3": "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "mistral": "mistralai-Mistral-Nemo-Instruct-2407.jinja",
}


@pytest.fixture(scope="module", params=sorted(NATIVE))
def native(request: pytest.FixtureRequest) -> Iterator[tuple[str, EngineProc]]:
    name = request.param
    template = TEMPLATES / NATIVE[name]
    with running_engine(
        "--ctx", "4096", "--threads", "2", "--chat-template-file", str(template)
    ) as proc:
        yield name, proc


def test_each_native_format_through_the_engine(native: tuple[str, EngineProc]) -> None:
    name, engine = native
    with engine.client() as c:
        assert c.get("/v1/engine/status").json()["tool_format"]["name"] == name
        # The self-test's forced call parses back in this format too.
        assert wait_for(
            lambda: c.get("/v1/engine/status").json()["tool_format"]["self_test"] is not None,
            timeout=600,
            interval=0.2,
        )
        assert c.get("/v1/engine/status").json()["tool_format"]["self_test"] is True
    client = openai.OpenAI(base_url=engine.base_url + "/v1", api_key=engine.key, max_retries=0)
    # Mistral's template insists on nine-character call ids.
    call_id = "abcDEF123"
    history: list[Any] = [
        {"role": "user", "content": "What is the weather in Rome for 2 days?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome", "days": 2}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": "Rainy."},
        {"role": "assistant", "content": "It is rainy in Rome."},
        *ASK,
    ]
    fields: dict[str, Any] = {
        "messages": history,
        "tools": TOOLS,
        "tool_choice": NAMED,
        "max_tokens": 96,
        "temperature": 0,
    }
    whole = client.chat.completions.create(model="m", **fields)
    assert whole.choices[0].finish_reason == "tool_calls"
    expected = check_calls(whole.choices[0].message.tool_calls, {"get_weather"})
    calls, _content, finish = stream_calls(client, **fields)
    assert finish == "tool_calls"
    assert check_calls(calls) == expected
    if name == "mistral":
        assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)


def test_chat_template_file_that_does_not_compile_is_a_start_up_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for x in %}")
    with (
        pytest.raises(RuntimeError, match="chat template file"),
        running_engine("--chat-template-file", str(bad)),
    ):
        pass
