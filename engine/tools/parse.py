"""Reads tool calls and reasoning out of a model's answer, whole or as it streams.

One `StreamParser` serves both: a non-streamed answer is the same parser fed
the whole text at once (`parse_output`), so a stream assembles to exactly
the non-streamed result wherever it was cut. Text stops being emitted as
content once a call starts (and text that may begin a call marker is held
back); each call is emitted once it is complete. A call marker inside
`<think>` is reasoning, not a call. Text that looked like a call but does not
parse comes back as content: nothing is lost.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.tools.formats import ToolFormat

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text (OpenAI's form)


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class CallDelta:
    index: int
    call: ToolCall


ParseEvent = ContentDelta | ReasoningDelta | CallDelta


@dataclass
class ParsedOutput:
    content: str
    reasoning: str | None
    calls: list[ToolCall] = field(default_factory=list)


def openai_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def short_call_id() -> str:
    """Nine letters and digits: the ids Mistral's templates insist on."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(9))


# --- one call's syntax, per format ----------------------------------------------


@dataclass(frozen=True)
class _RawCall:
    name: str
    arguments: dict[str, Any]
    id: str | None = None


_WS = re.compile(r"\s*")
_DECODER = json.JSONDecoder()


def _skip_ws(text: str, pos: int) -> int:
    m = _WS.match(text, pos)
    return m.end() if m else pos


def _call_from_object(obj: Any) -> _RawCall | None:
    """`{"name", "arguments" | "parameters"}` (arguments an object, or an object as JSON text)."""
    if not isinstance(obj, dict):
        return None
    if "function" in obj and isinstance(obj["function"], dict):
        inner = _call_from_object(obj["function"])
        return _RawCall(inner.name, inner.arguments, obj.get("id")) if inner else None
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    call_id = obj.get("id")
    return _RawCall(name, args, call_id if isinstance(call_id, str) else None)


def _json_at(text: str, pos: int) -> tuple[Any, int] | None:
    try:
        return _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError:
        return None


def _marked_call(text: str, pos: int, marker: str) -> tuple[_RawCall, int] | None:
    """`marker` then one JSON call object, from `pos` (whitespace allowed around the
    marker): the call and the offset just past the object."""
    start = _skip_ws(text, pos)
    if not text.startswith(marker, start):
        return None
    decoded = _json_at(text, _skip_ws(text, start + len(marker)))
    if decoded is None:
        return None
    call = _call_from_object(decoded[0])
    return None if call is None else (call, decoded[1])


def _hermes(text: str, pos: int, final: bool) -> tuple[list[_RawCall], int] | None:
    """`<tool_call>{"name": …, "arguments": {…}}</tool_call>` (Hermes, Qwen2.5, the fallback)."""
    found = _marked_call(text, pos, "<tool_call>")
    if found is None:
        return None
    call, end = found
    end = _skip_ws(text, end)
    if text.startswith("</tool_call>", end):
        return [call], end + len("</tool_call>")
    if final and end == len(text):
        return [call], end  # the answer ended before the closing tag
    return None


def _convert_value(raw: str, schema: Any) -> Any:
    """A parameter value written as text (XML formats): raw text for strings, JSON otherwise."""
    types = schema.get("type") if isinstance(schema, dict) else None
    types = types if isinstance(types, list) else [types]
    if "string" in types and len(types) == 1:
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                return raw
            return value if isinstance(value, str) else raw
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


_QWEN_CALL = re.compile(
    r"\s*<tool_call>\s*<function=([^>\n]+)>(.*?)</function>\s*</tool_call>", re.DOTALL
)
_QWEN_PARAM = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)
_GLM_CALL = re.compile(r"\s*<tool_call>\s*([^<\n]+?)\s*((?:<arg_key>.*?)?)</tool_call>", re.DOTALL)
_GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


def _params_of(tools: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    props = tools.get(name, {}).get("properties") if isinstance(tools.get(name), dict) else None
    return props if isinstance(props, dict) else {}


def _qwen3(
    tools: Mapping[str, Any],
) -> Callable[[str, int, bool], tuple[list[_RawCall], int] | None]:
    def parse(text: str, pos: int, final: bool) -> tuple[list[_RawCall], int] | None:
        m = _QWEN_CALL.match(text, pos)
        if m is None:
            return None
        name = m.group(1).strip()
        props = _params_of(tools, name)
        args = {
            k.strip(): _convert_value(v, props.get(k.strip()))
            for k, v in _QWEN_PARAM.findall(m.group(2))
        }
        return [_RawCall(name, args)], m.end()

    return parse


def _glm(tools: Mapping[str, Any]) -> Callable[[str, int, bool], tuple[list[_RawCall], int] | None]:
    def parse(text: str, pos: int, final: bool) -> tuple[list[_RawCall], int] | None:
        m = _GLM_CALL.match(text, pos)
        if m is None:
            return None
        name = m.group(1).strip()
        props = _params_of(tools, name)
        args = {
            k.strip(): _convert_value(v, props.get(k.strip()))
            for k, v in _GLM_ARG.findall(m.group(2))
        }
        return [_RawCall(name, args)], m.end()

    return parse


def _llama3(text: str, pos: int, final: bool) -> tuple[list[_RawCall], int] | None:
    """`<|python_tag|>{"name": …, "parameters": {…}}`, several separated by `;`."""
    found = _marked_call(text, pos, "<|python_tag|>")
    if found is None:
        return None
    call, end = found
    if text.startswith(";", end):
        end += 1
    return [call], end


def _mistral(text: str, pos: int, final: bool) -> tuple[list[_RawCall], int] | None:
    """`[TOOL_CALLS][{"name", "arguments", "id"}, …]`, or the newer `[TOOL_CALLS]name[ARGS]{…}`."""
    start = _skip_ws(text, pos)
    if not text.startswith("[TOOL_CALLS]", start):
        return None
    at = _skip_ws(text, start + len("[TOOL_CALLS]"))
    if text.startswith("[", at):
        decoded = _json_at(text, at)
        if decoded is None or not isinstance(decoded[0], list) or not decoded[0]:
            return None
        calls = [_call_from_object(o) for o in decoded[0]]
        if any(c is None for c in calls):
            return None
        return [c for c in calls if c is not None], decoded[1]
    marker = text.find("[ARGS]", at)
    if marker < 0:
        return None
    name = text[at:marker].strip()
    decoded = _json_at(text, _skip_ws(text, marker + len("[ARGS]")))
    if not name or decoded is None or not isinstance(decoded[0], dict):
        return None
    return [_RawCall(name, decoded[0])], decoded[1]


def _bare_json(text: str, tools: Mapping[str, Any]) -> list[_RawCall] | None:
    """The whole answer as one JSON call (or a list of them) naming known tools."""
    body = text.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, re.DOTALL)
    if fence:
        body = fence.group(1)
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("tool_calls"), list):
        obj = obj["tool_calls"]
    elif isinstance(obj, dict) and isinstance(obj.get("tool_call"), dict):
        obj = obj["tool_call"]
    items = obj if isinstance(obj, list) else [obj]
    calls = [_call_from_object(o) for o in items]
    if not calls or any(c is None or c.name not in tools for c in calls):
        return None
    return [c for c in calls if c is not None]


# --- the parser -----------------------------------------------------------------


def _held(text: str, markers: tuple[str, ...]) -> int:
    """How many trailing characters of `text` may be the start of one of `markers`."""
    hold = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:n]):
                hold = max(hold, n)
                break
    return hold


class StreamParser:
    """Splits an answer, fed piece by piece, into reasoning, content and tool calls.

    `tools` maps each tool's name to its parameters schema; None parses no
    calls (no tools, or `tool_choice: "none"`).
    """

    def __init__(
        self,
        fmt: ToolFormat,
        tools: Mapping[str, Any] | None,
        *,
        new_id: Callable[[], str] | None = None,
        in_reasoning: bool = False,
    ) -> None:
        self.fmt = fmt
        self.tools = tools
        self.new_id = new_id or (short_call_id if fmt.name == "mistral" else openai_call_id)
        self._buf = ""
        # start, reasoning, content, json, calls; a prompt that opened `<think>` starts in reasoning.
        self._mode = "reasoning" if in_reasoning else "start"
        self._think_done = False
        self._calls_text = ""
        self._calls: list[ToolCall] = []
        self._parsed_to = 0  # end of the last complete call in _calls_text
        self.call_syntax: Callable[[str, int, bool], tuple[list[_RawCall], int] | None] = {
            "hermes": _hermes,
            "generic": _hermes,
            "qwen3_coder": _qwen3(tools or {}),
            "glm45": _glm(tools or {}),
            "llama3": _llama3,
            "mistral": _mistral,
        }[fmt.name]

    @property
    def calls(self) -> list[ToolCall]:
        return list(self._calls)

    def feed(self, text: str) -> list[ParseEvent]:
        self._buf += text
        return self._advance(final=False)

    def finish(self) -> list[ParseEvent]:
        return self._advance(final=True)

    def _advance(self, final: bool) -> list[ParseEvent]:
        out: list[ParseEvent] = []
        while True:
            mode = self._mode
            if mode == "start":
                if not self._decide_start(final):
                    break
            elif mode == "reasoning":
                end = self._buf.find(THINK_CLOSE)
                if end >= 0:
                    if end:
                        out.append(ReasoningDelta(self._buf[:end]))
                    self._buf = self._buf[end + len(THINK_CLOSE) :]
                    self._think_done = True
                    self._mode = "start"
                    continue
                keep = 0 if final else _held(self._buf, (THINK_CLOSE,))
                if len(self._buf) > keep:
                    out.append(ReasoningDelta(self._buf[: len(self._buf) - keep]))
                    self._buf = self._buf[len(self._buf) - keep :]
                break
            elif mode == "content":
                self._content(out, final)
                break
            elif mode == "calls":
                self._calls_text += self._buf
                self._buf = ""
                self._take_calls(out, final)
                break
            else:  # json: held whole until the end
                if final:
                    calls = _bare_json(self._buf, self.tools or {})
                    if calls is None:
                        out.append(ContentDelta(self._buf))
                    else:
                        for raw in calls:
                            out.append(self._add(raw))
                    self._buf = ""
                break
        return out

    def _decide_start(self, final: bool) -> bool:
        """Looks at the start of the answer (or of what follows the reasoning); False: wait."""
        head = self._buf.lstrip()
        if not head and not final:
            return False
        if not self._think_done:
            if head.startswith(THINK_OPEN):
                self._buf = head[len(THINK_OPEN) :]
                self._mode = "reasoning"
                return True
            if THINK_OPEN.startswith(head) and head and not final:
                return False
        if self.tools is not None and self.fmt.bare_json and head:
            if head.startswith(("{", "```", "[{")):
                self._buf = head
                self._mode = "json"
                return True
            if ("```".startswith(head) or head == "[") and not final:
                return False
        # Whitespace between the reasoning (or the turn's start) and the text is not content.
        self._buf = head
        self._mode = "content"
        return True

    def _content(self, out: list[ParseEvent], final: bool) -> None:
        triggers = self.fmt.triggers if self.tools is not None else ()
        starts = [i for i in (self._buf.find(t) for t in triggers) if i >= 0]
        if starts:
            cut = min(starts)
            before = self._buf[:cut].rstrip()
            if before:
                out.append(ContentDelta(before))
            self._calls_text = self._buf[cut:]
            self._buf = ""
            self._mode = "calls"
            self._take_calls(out, final)
            return
        if final:
            keep = 0
        else:
            # Hold what may begin a marker, and the whitespace before it (dropped before a call).
            marker = _held(self._buf, triggers)
            head = self._buf[: len(self._buf) - marker]
            keep = marker + len(head) - len(head.rstrip())
        if len(self._buf) > keep:
            out.append(ContentDelta(self._buf[: len(self._buf) - keep]))
            self._buf = self._buf[len(self._buf) - keep :]

    def _take_calls(self, out: list[ParseEvent], final: bool) -> None:
        text = self._calls_text
        while True:
            parsed = self.call_syntax(text, self._parsed_to, final)
            if parsed is None:
                break
            raws, end = parsed
            for raw in raws:
                out.append(self._add(raw))
            self._parsed_to = end
        if final:
            rest = text[self._parsed_to :]
            if not self._calls:
                if rest:
                    out.append(ContentDelta(rest))  # not a call after all
            elif rest.strip():
                out.append(ContentDelta(rest.strip()))
            self._calls_text = ""
            self._parsed_to = 0

    def _add(self, raw: _RawCall) -> CallDelta:
        call_id = raw.id if raw.id and self.fmt.name == "mistral" else self.new_id()
        call = ToolCall(call_id, raw.name, json.dumps(raw.arguments, ensure_ascii=False))
        self._calls.append(call)
        return CallDelta(len(self._calls) - 1, call)


def parse_output(
    fmt: ToolFormat,
    text: str,
    tools: Mapping[str, Any] | None,
    *,
    new_id: Callable[[], str] | None = None,
    in_reasoning: bool = False,
) -> ParsedOutput:
    """A whole answer's content, reasoning and tool calls."""
    parser = StreamParser(fmt, tools, new_id=new_id, in_reasoning=in_reasoning)
    events = parser.feed(text) + parser.finish()
    return collect(events)


def collect(events: list[ParseEvent]) -> ParsedOutput:
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    reasoning = [e.text for e in events if isinstance(e, ReasoningDelta)]
    calls = [e.call for e in events if isinstance(e, CallDelta)]
    return ParsedOutput(content, "".join(reasoning) if reasoning else None, calls)
