"""Hostile model files beyond the header: chat templates and absurd metadata.

Chat templates come from model files, so they are attacker-controlled. These
tests render templates that loop forever, double strings, build huge numbers
or format widths, recurse, or nest deeply, and check each fails with one
clear TemplateError while the same ChatTemplate (and the real engine) keeps
working. Real-world templates must render exactly as plain Jinja renders them.

Metadata that is well-typed but absurd (no tokens, 0 layers, a 64-bit context
length...) is refused by the GGUF gate with one line naming the key, before
llama.cpp (which aborts the process on several of them) or the planner (which
hung on one) sees it.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.gguf.chat_template import CHATML_TEMPLATE, ChatTemplate, RenderLimits, TemplateError
from engine.gguf.header import GGUFError, read_gguf_header, validate_gguf_file
from tests.engine_proc import EngineProc, read_events, running_engine, serve_command
from tests.gguf_fixtures import BYTE_TOKENS, INT32, TOKENS, UINT64, Typed, tiny_model

# --- real-world templates (as published in the models' tokenizer configs) -------------

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# Qwen2.5-style, with tools: tojson, namespace, loop.last, attribute access, |join.
QWEN_TOOLS = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}
    {%- else %}{{- 'You are Qwen, created by Alibaba Cloud.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(turns=0, names=[]) %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {%- set ns.turns = ns.turns + 1 %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls | default([]) %}
            {%- set ns.names = ns.names + [tool_call.function.name] %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.function.name }}
            {{- '", "arguments": ' }}{{- tool_call.function.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if ns.names %}{{- '<!-- tools used: ' ~ ns.names | join(', ') ~ ' -->' }}{%- endif %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

# Constructs that bounded code paths touch: macros (with recursion), call blocks,
# set blocks, cycler, joiner, dict, %, str.format, filters, slices, recursive loops.
FEATURES = """{%- macro turn(m, depth=0) -%}
[{{ depth }}:{{ m.role|upper }}{% if depth < 2 %}{{ turn(m, depth + 1) }}{% endif %}]
{%- endmacro -%}
{%- macro box(title) -%}<{{ title }}>{{ caller() }}</{{ title }}>{%- endmacro -%}
{%- set c = cycler('odd', 'even') -%}{%- set j = joiner(' | ') -%}
{%- set meta = dict(n=messages|length, first=messages[0].role) -%}
{%- set header -%}{{ meta.n }} messages, first {{ meta.first }}{%- endset -%}
{{ header|center(40) }}
{% for m in messages -%}
{{ j() }}{{ c.next() }} {{ turn(m) }} {{ '%-6s|%3d' % (m.role, loop.index) }}
{{ '{:>8}/{}'.format(m.role, loop.length) }} {{ m.content[:12]|replace(' ', '_') }}
{%- call box('c') %}{{ m.content|wordwrap(20)|indent(2) }}{% endcall %}
{%- endfor %}
{{ (messages|map(attribute='role')|list * 2)|join(',') }} {{ [[1, 2], [3]]|sum(start=[]) }}
{{ range(5)|batch(2)|list }} {{ range(5)|slice(2)|list }} {{ 2 ** 10 }} {{ 'ab' * 3 }}
{% for item in [1, [2, [3, 4]], 5] recursive -%}
{% if item is iterable %}({{ loop(item) }}){% else %}{{ item }}{% endif %}
{%- endfor %}
{{ messages[0]|tojson }} {{ messages[-1].content|truncate(20) }} {{ 'a\\tb'.expandtabs(4) }}
{{ '-'.join(['x', 'y']) }} {{ 'x'.rjust(5, '.') }} {{ 'aXa'.replace('a', 'bb') }}
"""

CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello there!"}],
    [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "  It is 4.  "},
        {"role": "user", "content": "And {{ 3 + 3 }} in words, <|im_end|>?"},
    ],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Naïve café, 東京, emoji 🦅, tab\there"},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "x" * 5000},
    ],
    [{"role": "user", "content": "one"}, {"role": "user", "content": "two, no answer between"}],
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOL_CHAT: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
    },
    {"role": "user", "content": "Thanks"},
]


def _plain_raise(message: str) -> None:
    raise TemplateError(f"the model's chat template refused the messages: {message}")


def plain_render(source: str, messages: list[dict[str, Any]], **extra: Any) -> str:
    """What unbounded Jinja makes of the template: the reference output."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined
    )
    env.globals["raise_exception"] = _plain_raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    # Templates are written for Hugging Face's `tojson`: keys in order, no HTML escaping.
    env.filters["tojson"] = (
        lambda value, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )
    )
    variables = {
        "messages": messages,
        "add_generation_prompt": True,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "tools": None,
        **extra,
    }
    return env.from_string(source).render(variables)


def outcome(render: Callable[..., str], *args: Any) -> str:
    try:
        return render(*args)
    except TemplateError as exc:
        return f"TemplateError: {exc}"


@pytest.mark.parametrize(
    "source",
    [CHATML_TEMPLATE, LLAMA3, GEMMA, MISTRAL, QWEN_TOOLS, FEATURES],
    ids=["chatml", "llama3", "gemma", "mistral", "qwen-tools", "features"],
)
def test_real_templates_render_exactly_as_plain_jinja(source: str) -> None:
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    outcomes = set()
    for chat in CHATS:
        ours = outcome(template.render, chat)
        assert ours == outcome(plain_render, source, chat)
        outcomes.add(ours.startswith("TemplateError"))
    if source is QWEN_TOOLS:
        ours = template.render(TOOL_CHAT, tools=TOOLS)
        assert ours == plain_render(source, TOOL_CHAT, tools=TOOLS)
        assert "get_weather" in ours and '"city": "Oslo"' in ours
    # Gemma and Mistral refuse some chats (system role, roles not alternating): same
    # refusal as plain Jinja, as a TemplateError with the template's own words.
    assert outcomes == ({False, True} if source in (GEMMA, MISTRAL) else {False})


def test_the_default_models_template_renders_exactly_as_before(default_model: Path) -> None:
    source = read_gguf_header(default_model).chat_template
    assert source is not None
    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    long_chat = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " * 40}
        for i in range(200)
    ]
    for chat in [*CHATS, long_chat]:
        assert template.render(chat) == plain_render(source, chat)


def test_a_long_honest_chat_is_not_mistaken_for_a_hostile_template() -> None:
    # 6 M characters is over the fixed value and output limits: they grow with the input.
    limits = RenderLimits()
    big = "word " * ((6 << 20) // 5)
    assert len(big) > max(limits.max_value, limits.max_output // 2)
    text = ChatTemplate(None, limits=limits).render([{"role": "user", "content": big}])
    assert text.startswith("<|im_start|>user\nword word") and len(text) > len(big)


# --- hostile templates -----------------------------------------------------------------

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
SILENT_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
DOUBLING = (
    "{% set ns = namespace(x='ab') %}{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}"
    "{% endfor %}{{ ns.x|length }}"
)
UNROLLED_DOUBLING = "{% set x = 'ab' %}" + "{% set x = x + x %}" * 40 + "{{ x|length }}"

HOSTILE: dict[str, tuple[str, str]] = {
    "nested range loops": (NESTED_LOOPS, "too many loop iterations"),
    "nested loops that print nothing": (SILENT_LOOPS, "too many loop iterations"),
    "string times a huge number": ("{{ 'a' * 100000000 }}", "value too large"),
    "list times a huge number": ("{{ ([1] * 100000000)|length }}", "value too large"),
    "x ~ x doubling in a loop": (DOUBLING, "value too large"),
    "x + x doubling unrolled": (UNROLLED_DOUBLING, "value too large"),
    "huge power": ("{{ 2 ** 100000000 }}", "number too large"),
    "squaring in a loop": (
        "{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}"
        "{% endfor %}{{ ns.n > 0 }}",
        "number too large",
    ),
    "% format width": ("{{ '%999999999d' % 1 }}", "value too large"),
    "% format precision": ("{{ '%.999999999f' % 1.0 }}", "value too large"),
    "% star width": ("{{ '%*d' % (999999999, 1) }}", "'*' width"),
    "format filter width": ("{{ '%999999999s'|format('a') }}", "value too large"),
    "str.format width": ("{{ '{:>999999999}'.format(1) }}", "value too large"),
    "str.format nested width": ("{{ '{:>{}}'.format(1, 999999999) }}", "value too large"),
    "str.format_map width": ("{{ '{a:>999999999}'.format_map({'a': 1}) }}", "value too large"),
    "center filter": ("{{ 'a'|center(999999999) }}", "value too large"),
    "center method": ("{{ 'a'.center(999999999) }}", "value too large"),
    "ljust method": ("{{ 'a'.ljust(999999999) }}", "value too large"),
    "zfill method": ("{{ '1'.zfill(999999999) }}", "value too large"),
    "expandtabs": ("{{ ('\\t' * 1000).expandtabs(999999) }}", "value too large"),
    "indent filter": ("{{ ('a\\n' * 100000)|indent(1000) }}", "value too large"),
    "wordwrap wrapstring": ("{{ ('a ' * 10000)|wordwrap(1, wrapstring='x' * 10000) }}", "value"),
    "join filter separator": ("{{ ([1] * 1000000)|join('x' * 1000) }}", "value too large"),
    "join method separator": ("{{ ('x' * 100000).join(['a'] * 100000) }}", "value too large"),
    "replace filter": ("{% set s = 'a' * 1000 %}{{ s|replace('a', s * 1000) }}", "value"),
    "replace method": ("{% set s = 'a' * 1000 %}{{ s.replace('', s * 1000) }}", "value"),
    "repr of many references": (
        "{% set s = 'a' * 1000000 %}{{ [s] * 100000 }}",
        "value too large",
    ),
    "tojson of many references": (
        "{% set s = 'a' * 1000000 %}{{ ([s] * 100000)|tojson }}",
        "value too large",
    ),
    "tojson huge indent": ("{{ messages|tojson(indent=100000000) }}", "JSON indent"),
    "string filter of many references": (
        "{% set s = 'a' * 1000000 %}{{ ([s] * 100000)|string|length }}",
        "value too large",
    ),
    "batch fill": ("{{ [1]|batch(1000000000, 'x')|list|length }}", "value too large"),
    "slice count": ("{{ [1]|slice(1000000000)|list|length }}", "loop iterations"),
    "sum of lists": ("{{ ([[1] * 1000] * 100000)|sum(start=[])|length }}", "too much data"),
    "keeping many big strings": (
        "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}"
        "{% set ns.l = ns.l + ['x' * 4000000 ~ i] %}{% endfor %}{{ ns.l|length }}",
        "too much data",
    ),
    "slicing copies kept": (
        "{% set s = 'x' * 4000000 %}{% set ns = namespace(l=[]) %}{% for i in range(100000) %}"
        "{% set ns.l = ns.l + [s[i:]] %}{% endfor %}{{ ns.l|length }}",
        "too much data",
    ),
    "set block of repeated output": (
        "{% set s = 'x' * 4000000 %}{% set big %}{% for i in range(1000) %}{{ s }}{% endfor %}"
        "{% endset %}{{ big|length }}",
        "value too large",
    ),
    "macro output repeated": (
        "{% macro m(s) %}{% for i in range(1000) %}{{ s }}{% endfor %}{% endmacro %}"
        "{{ m('x' * 4000000)|length }}",
        "value too large",
    ),
    "output flood": (
        "{% for i in range(1000) %}{{ 'x' * 4000000 }}{% endfor %}",
        "too much output",
    ),
    "infinite macro recursion": (
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "recursed too deeply",
    ),
    "exponential macro recursion": (
        "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
        "{{ f(40) }}",
        "took too long",
    ),
    "recursive loop over itself": (
        "{% set l = [[1]] %}{% for x in l recursive %}{{ loop(l) }}{% endfor %}",
        "recursed too deeply",
    ),
    "lipsum is gone": ("{{ lipsum(100000) }}", "'lipsum' is undefined"),
    "include": ("{% include 'other' %}", "failed"),
    "division by zero": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "mutation": ("{{ messages.append(1) }}", "failed"),
}


class TickingClock:
    """A clock that moves forward by `step` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


HELLO = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize("source, why", HOSTILE.values(), ids=list(HOSTILE))
def test_hostile_template_fails_with_one_clear_error(source: str, why: str) -> None:
    # For the slow ones, a clock that runs 1 ms per reading reaches the deadline at once.
    clock = TickingClock(0.001) if why == "took too long" else time.monotonic
    template = ChatTemplate(source, clock=clock)
    with pytest.raises(TemplateError) as info:
        template.render(HELLO)
    message = str(info.value)
    assert message.startswith("the model's chat template"), message
    assert why in message, message
    assert "\n" not in message and len(message) < 400


def test_the_deadline_stops_a_loop_within_the_iteration_budget() -> None:
    # 100,000 silent iterations are within budget: only the clock can stop them.
    source = "{% for i in range(100000) %}{% endfor %}done"
    assert ChatTemplate(source).render(HELLO) == "done"
    slow = ChatTemplate(source, clock=TickingClock(0.001), limits=RenderLimits(seconds=5.0))
    with pytest.raises(TemplateError, match="took too long to render \\(over 5 s\\)"):
        slow.render(HELLO)


def test_a_template_recovers_after_a_refused_render() -> None:
    source = (
        "{% if messages[-1].content == 'boom' %}{% set ns = namespace(x='ab') %}"
        "{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}"
        "{% elif messages[-1].content == 'spin' %}{{ range(100000)|map('string')|join|length }}"
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
        "{% else %}" + CHATML_TEMPLATE + "{% endif %}"
    )
    template = ChatTemplate(source)
    for attack in ("boom", "spin", "boom"):
        with pytest.raises(TemplateError):
            template.render([{"role": "user", "content": attack}])
        # The budget is per render: the next honest chat renders in full.
        assert template.render(HELLO) == plain_render(CHATML_TEMPLATE, HELLO)


def test_raise_exception_message_stays_one_short_line() -> None:
    template = ChatTemplate("{{ raise_exception('line\\nbreak ' * 10000) }}")
    with pytest.raises(TemplateError) as info:
        template.render(HELLO)
    message = str(info.value)
    assert message.startswith("the model's chat template refused the messages: line break")
    assert "\n" not in message and len(message) <= 301


@pytest.mark.parametrize(
    "source, why",
    [
        ("{% if true %}" * 200 + "x" + "{% endif %}" * 200, "nested too deeply"),
        ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "nested too deeply"),
        ("{{ " + "[" * 5000 + "]" * 5000 + " }}", "nested too deeply"),
        ("{{ 1" + " + 1" * 5000 + " }}", "nested too deeply"),
        ("{% for x in y %}" * 30 + "{% endfor %}" * 30, "cannot be compiled"),
        ("x" * ((256 << 10) + 1), "too large"),
        ("{% for %}", "invalid"),
        ("{{ messages", "invalid"),
    ],
    ids=[
        "nested ifs",
        "parentheses",
        "brackets",
        "long sum",
        "nested loops",
        "huge",
        "bad1",
        "bad2",
    ],
)
def test_a_template_that_cannot_be_compiled_is_refused_at_load(source: str, why: str) -> None:
    with pytest.raises(TemplateError) as info:
        ChatTemplate(source)
    assert why in str(info.value) and "\n" not in str(info.value)


def test_a_big_but_reasonable_template_compiles_and_renders() -> None:
    # 150 KB of blocks: bigger than any real template, under the source limit.
    blocks = "".join(
        f"{{% if messages[0].content == 'k{i}' %}}block {i} {{{{ messages[0].role }}}}{{% endif %}}"
        for i in range(2500)
    )
    source = blocks + "{% if messages[0].content == 'hello' %}" + CHATML_TEMPLATE + "{% endif %}"
    assert len(source) > 150_000
    template = ChatTemplate(source)
    assert template.render([{"role": "user", "content": "k2499"}]) == "block 2499 user"
    assert template.render(HELLO) == plain_render(CHATML_TEMPLATE, HELLO)


def test_the_sandbox_still_hides_python_internals() -> None:
    template = ChatTemplate("[{{ messages.__class__.__mro__ }}{{ ''.__class__ }}]")
    assert template.render(HELLO) == "[]"


def test_a_template_that_is_not_text_is_refused() -> None:
    with pytest.raises(TemplateError, match="not text"):
        ChatTemplate(42)  # type: ignore[arg-type]


# --- the real engine with a hostile template ------------------------------------------

ENGINE_TEMPLATE = (
    "{% set last = messages[-1]['content'] %}"
    "{% if last == 'boom' %}{% set ns = namespace(x='ab') %}"
    "{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}"
    "{% elif last == 'spin' %}"
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{% elif last == 'recurse' %}{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"
    "{% elif last == 'refuse' %}{{ raise_exception('this model refuses everything') }}"
    "{% else %}" + CHATML_TEMPLATE + "{% endif %}"
)


def copy_with_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of a GGUF (weights included) whose tokenizer.chat_template is `template`."""
    reader = gguf.GGUFReader(str(src))
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "tokenizer.chat_template"):
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), field.types[0], sub)
    writer.add_chat_template(template)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    return dst


@pytest.fixture(scope="module")
def hostile_model(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("hostile-template") / "hostile-template.gguf"
    yield copy_with_template(default_model, path, ENGINE_TEMPLATE)
    path.unlink()


@pytest.fixture(scope="module")
def engine(hostile_model: Path) -> Iterator[EngineProc]:
    with running_engine("--model", str(hostile_model), "--ctx", "512", "--threads", "1") as proc:
        yield proc
    log = "".join(proc.stderr_lines)
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.slow
def test_the_engine_answers_hostile_renders_with_400_and_keeps_serving(
    engine: EngineProc,
) -> None:
    with engine.client() as client:
        for attack, why in [
            ("boom", "value too large"),
            ("spin", "too many loop iterations"),
            ("recurse", "recursed too deeply"),
            ("refuse", "this model refuses everything"),
        ]:
            r = client.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": attack}], "max_tokens": 2},
            )
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == "chat_template_error", error
            assert error["message"].startswith("the model's chat template"), error
            assert why in error["message"], error
            assert client.get("/health").json() == {"status": "ok"}
        answer = engine.chat([{"role": "user", "content": "Say hi"}], max_tokens=4)
        assert answer["choices"][0]["message"]["content"]
        assert answer["usage"]["prompt_tokens"] > 3
    assert engine.proc.poll() is None


@pytest.mark.slow
def test_a_template_that_cannot_compile_fails_the_load_and_keeps_the_working_model(
    engine: EngineProc, default_model: Path, tmp_path: Path
) -> None:
    # llama.cpp loads this file; only the template (deeply nested blocks) is refused.
    nested = "{% if true %}" * 300 + "x" + "{% endif %}" * 300
    path = copy_with_template(default_model, tmp_path / "nested-template.gguf", nested)
    with engine.client() as client:
        model_id = client.get("/v1/engine/status").json()["model"]["id"]
        r = client.post("/v1/engine/load", json={"model": str(path), "n_ctx": 512, "threads": 1})
        assert r.status_code == 202, r.text
        status = _wait_for_load(client)
        assert "the model's chat template is nested too deeply" in (status["error"] or ""), status
        assert status["state"] == "ready" and status["model"]["id"] == model_id, status
    answer = engine.chat([{"role": "user", "content": "Say hi"}], max_tokens=4)
    assert answer["choices"][0]["message"]["content"]


# --- absurd metadata ------------------------------------------------------------------


# A SentencePiece vocabulary: three specials, "a", and the 256 byte tokens llama.cpp
# falls back on for any character no token covers.
ABSURD: dict[str, tuple[dict[str, Any], str]] = {
    "template is a number": (
        {"tokenizer.chat_template": 42},
        "tokenizer.chat_template is the number 42, not text",
    ),
    "template is an array": (
        {"tokenizer.chat_template": ["{{ messages }}", "x"]},
        "tokenizer.chat_template is an array of 2 items, not text",
    ),
    "no tokens": ({"tokenizer.ggml.tokens": Typed([], 8)}, "tokenizer.ggml.tokens is empty"),
    "duplicate tokens": (
        {"tokenizer.ggml.tokens": ["<unk>", "a", "</s>", "a", *BYTE_TOKENS]},
        "lists the token 'a' more than once",
    ),
    "tokens not strings": ({"tokenizer.ggml.tokens": [1, 2, 3, 4]}, "other than strings"),
    "scores for fewer tokens": (
        {"tokenizer.ggml.scores": [0.0, 0.0]},
        "tokenizer.ggml.scores is an array of 2 items for 260 tokens",
    ),
    "token types for fewer tokens": (
        {"tokenizer.ggml.token_type": Typed([1] * 3, INT32)},
        "tokenizer.ggml.token_type is an array of 3 items for 260 tokens",
    ),
    "a token named like a renamed empty one": (
        {"tokenizer.ggml.tokens": ["", "[EMPTY_0]", "</s>", "a", *BYTE_TOKENS]},
        "lists the token '[EMPTY_0]' more than once",
    ),
    "no layer count": ({"llama.block_count": None}, "there is no llama.block_count"),
    "unknown architecture": (
        {"general.architecture": "notanarch"},
        "there is no notanarch.block_count: not a model llama.cpp can load "
        "(architecture 'notanarch')",
    ),
    "zero layers": ({"llama.block_count": 0}, "llama.block_count is 0, outside the range 1..512"),
    "negative layers": ({"llama.block_count": Typed(-1, INT32)}, "llama.block_count is -1"),
    "4 billion layers": (
        {"llama.block_count": 4_000_000_000},
        "llama.block_count is 4,000,000,000",
    ),
    "layers as text": ({"llama.block_count": "12"}, "llama.block_count is a string"),
    "context of 0": ({"llama.context_length": 0}, "llama.context_length is 0"),
    "64-bit context": (
        {"llama.context_length": Typed(1 << 62, UINT64)},
        "llama.context_length is 4,611,686,018,427,387,904, outside the range 1..16,777,216",
    ),
    "4 billion token context": (
        {"llama.context_length": (1 << 32) - 1},
        "llama.context_length is 4,294,967,295, outside the range 1..16,777,216",
    ),
    "more MTP layers than layers": ({"llama.nextn_predict_layers": 2}, "nextn_predict_layers"),
    "too many experts": ({"llama.expert_count": 5000}, "llama.expert_count is 5,000"),
    "experts used without experts": ({"llama.expert_used_count": 2}, "set without experts"),
    "more experts used than exist": (
        {"llama.expert_count": 4, "llama.expert_used_count": 8},
        "expert_used_count must be 1..4",
    ),
    "experts but none used": ({"llama.expert_count": 4}, "expert_used_count must be 1..4"),
    "expert groups that do not divide": (
        {
            "llama.expert_count": 8,
            "llama.expert_used_count": 2,
            "llama.expert_group_count": 3,
            "llama.expert_group_used_count": 1,
        },
        "do not fit 8 experts",
    ),
    "SentencePiece vocabulary without byte tokens": (
        {"tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "a"]},
        "lacks the byte token <0x00> and 241 more: llama.cpp would abort",
    ),
    "SentencePiece vocabulary missing one byte": (
        {"tokenizer.ggml.tokens": [t for t in TOKENS if t != "<0xE2>"]},
        "lacks the byte token <0xE2>: llama.cpp would abort",
    ),
    "unknown rope scaling": ({"llama.rope.scaling.type": "warp"}, "'warp', not one llama.cpp"),
    "bos required but outside the vocabulary": (
        {"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": 1_000_000},
        "bos_token_id 1,000,000 is outside the vocabulary of 260 tokens",
    ),
}


def test_a_consistent_tiny_model_passes_the_gate(tmp_path: Path, default_model: Path) -> None:
    header = validate_gguf_file(tiny_model(tmp_path / "ok.gguf", llama__expert_count=0))
    assert header.block_count == 1 and header.context_length == 256
    scout_like = tiny_model(tmp_path / "long.gguf", llama__context_length=10_485_760)
    assert validate_gguf_file(scout_like).context_length == 10_485_760
    validate_gguf_file(
        tiny_model(
            tmp_path / "moe.gguf",
            llama__expert_count=8,
            llama__expert_used_count=Typed([2], INT32),
            llama__expert_group_count=4,
            llama__expert_group_used_count=2,
            llama__rope__scaling__type="yarn",
            tokenizer__ggml__add_bos_token=True,
            tokenizer__ggml__bos_token_id=1,
        )
    )
    # What llama.cpp accepts passes: empty tokens (it renames them), longer score arrays.
    validate_gguf_file(
        tiny_model(
            tmp_path / "loose.gguf",
            tokenizer__ggml__tokens=["", "", "</s>", "a", *BYTE_TOKENS],
            tokenizer__ggml__scores=[0.0] * 300,
        )
    )
    validate_gguf_file(default_model)


@pytest.mark.parametrize("changes, why", ABSURD.values(), ids=list(ABSURD))
def test_absurd_metadata_is_refused_with_one_line_naming_it(
    tmp_path: Path, changes: dict[str, Any], why: str
) -> None:
    path = tiny_model(
        tmp_path / "absurd.gguf", **{k.replace(".", "__"): v for k, v in changes.items()}
    )
    with pytest.raises(GGUFError) as info:
        validate_gguf_file(path)
    message = str(info.value)
    assert message.startswith("absurd.gguf: ") and why in message, message
    assert "\n" not in message


def test_remote_headers_with_absurd_sizes_read_as_missing(tmp_path: Path) -> None:
    # Remote files are planned from the header alone (no validate_gguf_file):
    # the shape properties must not hand the planner 4 billion layers.
    header = read_gguf_header(
        tiny_model(
            tmp_path / "remote.gguf",
            llama__block_count=4_000_000_000,
            llama__context_length=Typed(1 << 62, UINT64),
        )
    )
    assert header.block_count is None and header.context_length is None


@pytest.mark.parametrize(
    "changes, why",
    [
        # These made `profile` run out of memory, hang (the planner ranges over the
        # context in steps of 1024) and fail with "internal error: ValidationError".
        ({"llama__block_count": 4_000_000_000}, "llama.block_count is 4,000,000,000"),
        ({"llama__context_length": Typed(1 << 62, UINT64)}, "llama.context_length is"),
        ({"llama__context_length": (1 << 32) - 1}, "llama.context_length is 4,294,967,295"),
    ],
    ids=["4 billion layers", "64-bit context", "4 billion token context"],
)
def test_profile_refuses_absurd_metadata_in_one_line(
    tmp_path: Path, changes: dict[str, Any], why: str
) -> None:
    path = tiny_model(tmp_path / "absurd.gguf", **changes)
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "profile", "--model", str(path), "--estimate-only"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and why in lines[0], proc.stderr


@pytest.mark.slow
def test_serve_refuses_a_file_llama_cpp_would_abort_on(tmp_path: Path) -> None:
    path = tiny_model(tmp_path / "zero-layers.gguf", llama__block_count=0)
    proc = subprocess.Popen(
        serve_command("--port", "0", "--model", str(path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        events = read_events(proc, timeout=60)
        assert proc.wait(30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert events[-1]["event"] == "error", events
    assert "llama.block_count is 0" in events[-1]["message"]


def _wait_for_load(client: Any, timeout: float = 60.0) -> dict[str, Any]:
    """Polls the engine status until the posted load has run (ended in error or ready)."""
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = client.get("/v1/engine/status").json()
        if status["state"] != "loading" or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


@pytest.mark.slow
def test_absurd_loads_fail_in_status_while_the_engine_keeps_serving(
    engine: EngineProc, tmp_path: Path
) -> None:
    files = {
        # The first three abort the process in llama.cpp's loader (GGML_ASSERT), and
        # the engine loads in process: only the gate stands between them and llama.cpp.
        "llama.block_count is 0": tiny_model(tmp_path / "zero.gguf", llama__block_count=0),
        "more than once": tiny_model(
            tmp_path / "dup.gguf", tokenizer__ggml__tokens=["a", "a", "b", "c", *BYTE_TOKENS]
        ),
        "rope.scaling.type": tiny_model(tmp_path / "rope.gguf", llama__rope__scaling__type="x"),
        # llama.cpp would hand over "7" as the template text.
        "not text": tiny_model(tmp_path / "template.gguf", tokenizer__chat_template=7),
    }
    with engine.client() as client:
        model_id = client.get("/v1/engine/status").json()["model"]["id"]
        for why, path in files.items():
            r = client.post("/v1/engine/load", json={"model": str(path), "n_ctx": 512})
            assert r.status_code == 202, r.text
            status = _wait_for_load(client)
            assert why in (status["error"] or ""), status
            assert status["state"] == "ready" and status["model"]["id"] == model_id, status
            assert engine.proc.poll() is None, f"{path.name} killed the engine"
        answer = engine.chat([{"role": "user", "content": "Say hi"}], max_tokens=4)
        assert answer["choices"][0]["message"]["content"]
