"""Tool-call formats without the engine: detection, parsing (whole and streamed), grammars, prompts.

The grammars are checked with llguidance against the built-in model's real
vocabulary: each format's canonical call is accepted token by token, and a
wrong tool name or an argument outside its schema is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from llguidance import LLMatcher, LLTokenizer

from engine.gguf.chat_template import CHATML_TEMPLATE, ChatTemplate
from engine.structured.schema import SchemaError
from engine.tools.formats import ToolFormat, detect_format
from engine.tools.grammar import Tool, checked_parameters, tool_grammar
from engine.tools.parse import (
    ArgsDelta,
    CallEnd,
    CallStart,
    ContentDelta,
    ParsedOutput,
    ParseEvent,
    ReasoningDelta,
    StreamParser,
    ToolCall,
    collect,
    parse_output,
)
from engine.tools.prompt import prepare_chat

TEMPLATES = Path(__file__).parent / "data" / "templates"

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = {"get_weather": WEATHER, "get_time": {"type": "object", "properties": {}}}


def fmt_named(name: str) -> ToolFormat:
    triggers = {"llama3": "<|python_tag|>", "mistral": "[TOOL_CALLS]"}.get(name, "<tool_call>")
    return ToolFormat(name, (triggers,), True, bare_json=name in ("llama3", "generic"))  # type: ignore[arg-type]


# (format, text the model writes, the calls in it, the content around them)
SAMPLES: list[tuple[str, str, list[tuple[str, dict[str, Any]]], str]] = [
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
        [("get_weather", {"city": "Paris", "days": 2})],
        "Let me check.",
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>',
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})],
        "",
    ),
    (
        "qwen3_coder",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nSan <Francisco>\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>",
        [("get_weather", {"city": "San <Francisco>", "days": 3})],
        "",
    ),
    (
        "glm45",
        "Checking.<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>",
        [("get_weather", {"city": "Paris", "days": 2})],
        "Checking.",
    ),
    (
        "llama3",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        [("get_weather", {"city": "Paris"})],
        "",
    ),
    (
        "llama3",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome", "days": 1}}',
        [("get_weather", {"city": "Rome", "days": 1})],
        "",
    ),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]',
        [("get_weather", {"city": "Paris"})],
        "",
    ),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}, '
        '{"name": "get_weather", "arguments": {"city": "Rome", "days": 3}, "id": "abcDEF124"}]',
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome", "days": 3})],
        "",
    ),
    (
        "llama3",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
        '{"name": "get_weather", "parameters": {"days": 2, "city": "Rome"}}',
        [("get_weather", {"city": "Oslo"}), ("get_weather", {"days": 2, "city": "Rome"})],
        "",
    ),
    (
        "qwen3_coder",
        "Both.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
        "</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=days>\n7\n"
        "</parameter>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>",
        [("get_weather", {"city": "Oslo"}), ("get_weather", {"days": 7, "city": "Rome"})],
        "Both.",
    ),
    (
        "glm45",
        "<tool_call>get_time\n</tool_call>",
        [("get_time", {})],
        "",
    ),
    (
        "hermes",
        '<tool_call>\n{"arguments": {"city": "Lima", "days": 1}, "name": "get_weather"}\n</tool_call>',
        [("get_weather", {"city": "Lima", "days": 1})],
        "",
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}',
        [("get_weather", {"city": "Oslo"})],
        "",
    ),
    (
        "generic",
        '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
        [("get_weather", {"city": "Paris"})],
        "",
    ),
    (
        "generic",
        'Sure: <tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Lima\\"}"}\n</tool_call>',
        [("get_weather", {"city": "Lima"})],
        "Sure:",
    ),
]


def calls_of(parsed: ParsedOutput) -> list[tuple[str, dict[str, Any]]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


@pytest.mark.parametrize("grammar", [False, True])
@pytest.mark.parametrize(("fmt", "text", "calls", "content"), SAMPLES)
def test_each_native_format_is_parsed(
    fmt: str, text: str, calls: list[tuple[str, dict[str, Any]]], content: str, grammar: bool
) -> None:
    parsed = parse_output(fmt_named(fmt), text, TOOLS, grammar=grammar)
    assert calls_of(parsed) == calls
    assert parsed.content == content
    for name, args in calls_of(parsed):
        jsonschema.validate(args, TOOLS[name])
    assert all(c.id for c in parsed.calls)
    assert len({c.id for c in parsed.calls}) == len(parsed.calls)


def test_mistral_ids_are_nine_letters_and_digits() -> None:
    parsed = parse_output(
        fmt_named("mistral"), '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}', TOOLS
    )
    (call,) = parsed.calls
    assert len(call.id) == 9 and call.id.isalnum()


def counter_ids() -> Iterator[str]:
    n = 0
    while True:
        n += 1
        yield f"call_{n}"


def stream_events(
    fmt: ToolFormat,
    pieces: list[str],
    in_reasoning: bool = False,
    grammar: bool = False,
    tools: dict[str, Any] = TOOLS,
) -> list[ParseEvent]:
    ids = counter_ids()
    parser = StreamParser(
        fmt, tools, new_id=lambda: next(ids), in_reasoning=in_reasoning, grammar=grammar
    )
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.finish()


def streamed(
    fmt: ToolFormat, pieces: list[str], in_reasoning: bool = False, grammar: bool = False
) -> ParsedOutput:
    return collect(stream_events(fmt, pieces, in_reasoning, grammar))


def assembled(events: list[ParseEvent]) -> list[tuple[str, str, Any]]:
    """Each call as a client assembles it from starts and argument pieces: (id, name, arguments).

    Checks the order a client relies on: a call's start, then its pieces,
    then its end, all before the next call starts.
    """
    calls: list[tuple[str, str, str]] = []
    ended = 0
    for e in events:
        if isinstance(e, CallStart):
            assert e.index == len(calls) == ended, "a call starts after the one before ended"
            calls.append((e.id, e.name, ""))
        elif isinstance(e, ArgsDelta):
            assert e.index == len(calls) - 1 == ended, "pieces belong to the open call"
            call_id, name, args = calls[e.index]
            calls[e.index] = (call_id, name, args + e.text)
        elif isinstance(e, CallEnd):
            assert e.index == len(calls) - 1 == ended
            ended += 1
            assert (e.call.id, e.call.name) == calls[e.index][:2]
            assert json.loads(calls[e.index][2]) == json.loads(e.call.arguments)
    assert ended == len(calls), "every call that started ended"
    return [(i, n, json.loads(a)) for i, n, a in calls]


@pytest.mark.parametrize("grammar", [False, True])
@pytest.mark.parametrize(("fmt", "text", "calls", "content"), SAMPLES)
def test_a_call_split_at_every_byte_position_streams_to_the_same_result(
    fmt: str, text: str, calls: list[tuple[str, dict[str, Any]]], content: str, grammar: bool
) -> None:
    whole = streamed(fmt_named(fmt), [text], grammar=grammar)
    expected = [(c.id, c.name, json.loads(c.arguments)) for c in whole.calls]
    assert [(n, a) for _i, n, a in expected] == calls
    splits = [[text[:cut], text[cut:]] for cut in range(1, len(text))] + [list(text)]
    for pieces in splits:
        events = stream_events(fmt_named(fmt), pieces, grammar=grammar)
        assert collect(events) == whole, pieces
        # The pieces of each call's arguments join into exactly its arguments.
        assert assembled(events) == expected, pieces


def test_text_stops_streaming_once_a_call_starts_and_marker_prefixes_are_held() -> None:
    ids = counter_ids()
    parser = StreamParser(fmt_named("hermes"), TOOLS, new_id=lambda: next(ids))
    assert parser.feed("Let me look <tool") == [ContentDelta("Let me look")]
    assert parser.feed("_call>\n{") == []
    # Without a grammar holding it, a call is sent only once it is complete.
    assert parser.feed('"name": "get_weather", "arguments": {"city": "Paris"}}\n') == []
    events = parser.feed("</tool_call>")
    assert events == [
        CallStart(0, "call_1", "get_weather"),
        ArgsDelta(0, '{"city": "Paris"}'),
        CallEnd(0, ToolCall("call_1", "get_weather", '{"city": "Paris"}')),
    ]
    assert parser.finish() == []


# --- arguments as they are written ---------------------------------------------------

WRITE = {
    "type": "object",
    "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
    "required": ["path", "content"],
}
FILE_TEXT = "".join(f"line {i}: print('{i}')\n" for i in range(1, 40))
WRITE_ARGS = {"path": "a.txt", "content": FILE_TEXT}
JSON_ARGS = json.dumps(WRITE_ARGS)


def write_call(fmt: str) -> str:
    """A long write_file call as each format's grammar writes it."""
    if fmt in ("hermes", "generic"):
        return f'<tool_call>\n{{"name": "write_file", "arguments": {JSON_ARGS}}}\n</tool_call>'
    if fmt == "llama3":
        return f'{{"name": "write_file", "parameters": {JSON_ARGS}}}'
    if fmt == "llama3_tag":
        return f'<|python_tag|>{{"name": "write_file", "parameters": {JSON_ARGS}}}'
    if fmt == "mistral":
        return (
            f'[TOOL_CALLS][{{"name": "write_file", "arguments": {JSON_ARGS}, "id": "abcDEF123"}}]'
        )
    if fmt == "qwen3_coder":
        return (
            "<tool_call>\n<function=write_file>\n<parameter=path>\na.txt\n</parameter>\n"
            f"<parameter=content>\n{FILE_TEXT}\n</parameter>\n</function>\n</tool_call>"
        )
    assert fmt == "glm45"
    return (
        "<tool_call>write_file\n<arg_key>path</arg_key>\n<arg_value>a.txt</arg_value>\n"
        f"<arg_key>content</arg_key>\n<arg_value>{FILE_TEXT}</arg_value>\n</tool_call>"
    )


@pytest.mark.parametrize(
    "name", ["hermes", "generic", "llama3", "llama3_tag", "mistral", "qwen3_coder", "glm45"]
)
def test_arguments_stream_before_the_call_ends(name: str) -> None:
    fmt = fmt_named(name.removesuffix("_tag"))
    text = "Writing it.\n" + write_call(name) if name != "llama3" else write_call(name)
    tools = {"write_file": WRITE}
    ids = counter_ids()
    parser = StreamParser(fmt, tools, new_id=lambda: next(ids), grammar=True)
    # Fed up to the middle of the file's text: the call has started, and for
    # the JSON formats its arguments are arriving.
    middle = text.index("line 20")
    early = parser.feed(text[:middle])
    assert CallStart(0, "call_1", "write_file") in early
    sent = "".join(e.text for e in early if isinstance(e, ArgsDelta))
    if name in ("qwen3_coder", "glm45"):
        assert sent == '{"path": "a.txt"'  # one piece per parameter, once it is closed
    else:
        assert sent.startswith('{"path": "a.txt", "content": "line 1:') and "line 19" in sent
        assert JSON_ARGS.startswith(sent)
    assert not any(isinstance(e, CallEnd) for e in early)
    # Fed up to just before the call's closing marker: every argument is out.
    closing = {"qwen3_coder": "</function>", "glm45": "</tool_call>", "mistral": "}]"}
    end = text.rindex(closing.get(name, "}"))
    before_end = parser.feed(text[middle:end])
    sent += "".join(e.text for e in before_end if isinstance(e, ArgsDelta))
    if name in ("qwen3_coder", "glm45"):
        assert json.loads(sent + "}") == WRITE_ARGS
    else:
        assert json.loads(sent) == WRITE_ARGS
    assert not any(isinstance(e, CallEnd) for e in before_end)
    rest = parser.feed(text[end:]) + parser.finish()
    call = ToolCall("call_1", "write_file", json.dumps(WRITE_ARGS))
    assert rest[-1] == CallEnd(0, call)
    assert assembled(early + before_end + rest) == [("call_1", "write_file", WRITE_ARGS)]


def test_arguments_before_the_name_wait_for_it() -> None:
    parser = StreamParser(fmt_named("hermes"), TOOLS, grammar=True)
    assert parser.feed('<tool_call>\n{"arguments": {"city": "Li') == []
    events = parser.feed('ma"}, "name": "get_weather"')
    assert [type(e) for e in events] == [CallStart, ArgsDelta]
    assert events[1] == ArgsDelta(0, '{"city": "Lima"}')


def test_a_started_call_cut_off_stays_as_sent_and_is_not_content() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    events = stream_events(fmt_named("hermes"), [text], grammar=True)
    assert events[0] == CallStart(0, "call_1", "get_weather")
    assert "".join(e.text for e in events if isinstance(e, ArgsDelta)) == '{"city": "Par'
    assert not any(isinstance(e, CallEnd | ContentDelta) for e in events)
    # Without a grammar nothing was sent, so the text comes back as content.
    held = stream_events(fmt_named("hermes"), list(text))
    assert held == [ContentDelta(text)]


def test_a_call_that_turns_out_invalid_is_content_and_nothing_of_it_was_sent() -> None:
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}} and more'
    events = stream_events(fmt_named("hermes"), list(text))
    assert collect(events) == ParsedOutput(text, None, [])
    assert all(isinstance(e, ContentDelta) for e in events)


def test_a_marker_prefix_that_is_not_a_marker_is_released_as_text() -> None:
    parser = StreamParser(fmt_named("hermes"), TOOLS)
    assert parser.feed("a <to") == [ContentDelta("a")]
    assert parser.feed("ast>") == [ContentDelta(" <toast>")]


def test_think_goes_to_reasoning_and_a_marker_inside_it_is_not_a_call() -> None:
    text = (
        "<think>Maybe <tool_call>{...}</tool_call> is needed.</think>\n\n"
        'Calling.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    parsed = parse_output(fmt_named("hermes"), text, TOOLS)
    assert parsed.reasoning == "Maybe <tool_call>{...}</tool_call> is needed."
    assert parsed.content == "Calling."
    assert calls_of(parsed) == [("get_weather", {"city": "Oslo"})]
    for cut in range(1, len(text)):
        assert calls_of(streamed(fmt_named("hermes"), [text[:cut], text[cut:]])) == calls_of(parsed)


def test_a_prompt_that_opened_think_starts_in_reasoning() -> None:
    parsed = streamed(
        fmt_named("qwen3_coder"), ["Let me think.</think>\n\nHello!"], in_reasoning=True
    )
    assert parsed.reasoning == "Let me think."
    assert parsed.content == "Hello!"


def test_without_tools_markers_stay_text_and_reasoning_is_still_split() -> None:
    text = '<think>hm</think>Use <tool_call>{"name": "x"}</tool_call> like this.'
    parsed = parse_output(fmt_named("hermes"), text, None)
    assert parsed.calls == []
    assert parsed.reasoning == "hm"
    assert parsed.content == 'Use <tool_call>{"name": "x"}</tool_call> like this.'


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',  # cut by max_tokens
    ],
)
def test_a_broken_call_comes_back_as_content(text: str) -> None:
    parsed = parse_output(fmt_named("hermes"), text, TOOLS)
    assert parsed.calls == []
    assert parsed.content == text


def test_plain_json_answers_are_not_calls_unless_they_name_a_tool() -> None:
    text = '{"answer": 42}'
    parsed = parse_output(fmt_named("generic"), text, TOOLS)
    assert parsed.calls == [] and parsed.content == text


# --- detection -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected", "reasoning"),
    [
        ("Qwen-Qwen2.5-7B-Instruct.jinja", "hermes", False),
        ("Qwen3-Coder.jinja", "qwen3_coder", False),
        ("Qwen3.5-4B.jinja", "qwen3_coder", True),
        ("GLM-4.6.jinja", "glm45", True),
        ("meta-llama-Llama-3.1-8B-Instruct.jinja", "llama3", False),
        ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "mistral", False),
    ],
)
def test_the_format_is_chosen_from_the_template(
    template: str, expected: str, reasoning: bool
) -> None:
    fmt = detect_format((TEMPLATES / template).read_text())
    assert (fmt.name, fmt.native, fmt.reasoning) == (expected, True, reasoning)


def test_a_template_without_tools_gets_the_generic_injected_format() -> None:
    fmt = detect_format(CHATML_TEMPLATE)
    assert (fmt.name, fmt.native, fmt.bare_json) == ("generic", False, True)


def test_markers_that_are_control_tokens_are_recorded() -> None:
    source = (TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()
    fmt = detect_format(source, {"<tool_call>", "</tool_call>"}.__contains__)
    assert fmt.special == frozenset({"<tool_call>"})


# --- prompts ---------------------------------------------------------------------

HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "abcDEF123",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "abcDEF123", "content": "Sunny, 24 C"},
]
TOOL_OBJECTS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]


def test_a_template_without_tools_gets_them_in_the_system_turn_and_calls_as_text() -> None:
    # ChatML's `'…' + message['content']` would fail on the call turn's null content.
    template = ChatTemplate(CHATML_TEMPLATE)
    messages, tools = prepare_chat(detect_format(CHATML_TEMPLATE), HISTORY, TOOL_OBJECTS)
    assert tools is None
    prompt = template.render(messages)
    assert prompt.startswith("<|im_start|>system\n") and '"name": "get_weather"' in prompt
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        in prompt
    )
    assert "<|im_start|>user\n<tool_response>\nSunny, 24 C\n</tool_response>" in prompt


@pytest.mark.parametrize("template", sorted(p.name for p in TEMPLATES.glob("*.jinja")))
def test_native_templates_render_tools_calls_and_results(template: str) -> None:
    source = (TEMPLATES / template).read_text()
    fmt = detect_format(source)
    messages, tools = prepare_chat(fmt, HISTORY, TOOL_OBJECTS)
    prompt = ChatTemplate(source, bos_token="<s>", eos_token="</s>").render(messages, tools=tools)
    assert "get_weather" in prompt
    assert "Paris" in prompt and "Sunny, 24 C" in prompt


# --- grammars --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Iterator[LLTokenizer]:
    from engine.backend.llama import LlamaModel
    from engine.default_model import default_model_path
    from engine.wire.control import LoadRequest

    # The tokenizer reads the model's vocabulary: the model stays open while it is used.
    model = LlamaModel(LoadRequest(model=str(default_model_path()), n_ctx=256))
    try:
        yield model.grammar_tokenizer()
    finally:
        model.close()


CANONICAL = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
    "generic": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>',
    "qwen3_coder": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis <b>\n</parameter>\n"
    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
    "glm45": "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
    "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>",
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}, "id": "abcdEF123"}]',
}
CHECKED = checked_parameters([Tool("get_weather", None, WEATHER)])


def accepted(tok: LLTokenizer, grammar: str, text: str) -> bool:
    """Whether the grammar takes `text` whole, as a complete answer."""
    return accepted_ids(tok, grammar, tok.tokenize_str(text))


def accepted_ids(tok: LLTokenizer, grammar: str, ids: list[int]) -> bool:
    matcher = LLMatcher(tok, grammar, log_level=0)
    if matcher.validate_tokens(ids) != len(ids):
        return False
    return bool(matcher.consume_tokens(ids) and matcher.is_accepting())


@pytest.mark.parametrize("name", sorted(CANONICAL))
def test_grammars_accept_valid_calls_and_refuse_invalid_ones(
    tokenizer: LLTokenizer, name: str
) -> None:
    fmt = fmt_named(name)
    call = CANONICAL[name]
    required = tool_grammar(fmt, CHECKED, "required")
    auto = tool_grammar(fmt, CHECKED, "auto")
    assert required is not None and auto is not None
    assert accepted(tokenizer, required, call)
    assert not accepted(tokenizer, required, "Hello there")
    assert accepted(tokenizer, auto, "Hello there, no call here.")
    prefix = "" if name == "llama3" else "Let me check. "
    assert accepted(tokenizer, auto, prefix + call)
    # Once the marker is written, the call must follow the schema: the right
    # name, and arguments of the right types and bounds.
    for wrong in (call.replace("get_weather", "get_time"), call.replace("2", "9")):
        assert not accepted(tokenizer, auto, prefix + wrong)
        assert not accepted(tokenizer, required, wrong)
    assert tool_grammar(fmt, CHECKED, "none") is None
    assert calls_of(parse_output(fmt, prefix + call, TOOLS)) == [
        ("get_weather", {"city": "Paris <b>" if name == "qwen3_coder" else "Paris", "days": 2})
    ]


def test_llama3_auto_holds_a_bare_json_start_to_the_schema(tokenizer: LLTokenizer) -> None:
    auto = tool_grammar(fmt_named("llama3"), CHECKED, "auto")
    assert auto is not None
    matcher = LLMatcher(tokenizer, auto, log_level=0)
    ids = tokenizer.tokenize_str('{"name": "get_time"')
    assert matcher.validate_tokens(ids) < len(ids)


def test_a_control_token_marker_opens_a_call_only_as_that_token(tokenizer: LLTokenizer) -> None:
    # `<|im_start|>` is a control token of the built-in vocabulary, standing in
    # for `<tool_call>` in Qwen's: spelt out in free text it would look like a
    # call marker that no grammar holds (and the parser streams calls early).
    fmt = ToolFormat("hermes", ("<|im_start|>",), True, special=frozenset({"<|im_start|>"}))
    auto = tool_grammar(fmt, CHECKED, "auto")
    assert auto is not None
    call = '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    marker = tokenizer.tokenize_str("<|im_start|>", parse_special=True)
    assert len(marker) == 1
    as_token = tokenizer.tokenize_str("Let me check. ") + marker + tokenizer.tokenize_str(call)
    assert accepted_ids(tokenizer, auto, as_token)
    spelt = tokenizer.tokenize_str("Let me check. <|im_start|>" + call)
    assert marker[0] not in spelt
    assert not accepted_ids(tokenizer, auto, spelt)
    assert accepted(tokenizer, auto, "Plain text, no call.")


def test_one_call_unless_parallel_calls_are_asked_for(tokenizer: LLTokenizer) -> None:
    two = CANONICAL["hermes"] + "\n" + CANONICAL["hermes"]
    single = tool_grammar(fmt_named("hermes"), CHECKED, "required", parallel=False)
    parallel = tool_grammar(fmt_named("hermes"), CHECKED, "required", parallel=True)
    assert single is not None and parallel is not None
    assert not accepted(tokenizer, single, two)
    assert accepted(tokenizer, parallel, two)


def test_a_tool_schema_the_grammar_cannot_enforce_is_refused_naming_the_keyword() -> None:
    bad = Tool("f", None, {"type": "object", "properties": {"x": {"type": "string", "not": {}}}})
    with pytest.raises(SchemaError, match="'not'") as info:
        checked_parameters([Tool("g", None, WEATHER), bad])
    assert info.value.param == "tools.1.function.parameters"


def test_reasoning_events_stream_in_order() -> None:
    parser = StreamParser(fmt_named("hermes"), TOOLS)
    events = parser.feed("<think>a") + parser.feed("b</thi") + parser.feed("nk>c") + parser.finish()
    assert events == [ReasoningDelta("a"), ReasoningDelta("b"), ContentDelta("c")]
