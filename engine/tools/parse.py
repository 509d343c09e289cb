"""Reads tool calls and reasoning out of a model's answer, whole or as it streams.

One `StreamParser` serves both: a non-streamed answer is the same parser fed
the whole text at once (`parse_output`), so a stream assembles to exactly
the non-streamed result wherever it was cut. Text stops being emitted as
content once a call starts (and text that may begin a call marker is held
back). A call comes out as `CallStart` (its id and name), `ArgsDelta`
pieces of its arguments' JSON text, then `CallEnd` with the whole call.
Where a grammar holds the call to its syntax (`grammar=True`), the start
goes out as soon as the name is known and the arguments as they are
written; otherwise a call is held until it is complete and well-formed. A
call marker inside `<think>` is reasoning, not a call. Text that looked like
a call but does not parse comes back as content: nothing is lost.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.tools.formats import ToolFormat

log = logging.getLogger("peregrine.tools")

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
class CallStart:
    """A call begins: its id and name are known, its arguments follow as `ArgsDelta`s."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgsDelta:
    """A piece of a call's arguments, as JSON text; a call's pieces join into its arguments."""

    index: int
    text: str


@dataclass(frozen=True)
class CallEnd:
    """A call is complete; `call.arguments` equals (as JSON) the joined `ArgsDelta`s."""

    index: int
    call: ToolCall


ParseEvent = ContentDelta | ReasoningDelta | CallStart | ArgsDelta | CallEnd


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


_WS = re.compile(r"\s*")
_DECODER = json.JSONDecoder()
PYTHON_TAG = "<|python_tag|>"
# The keys a JSON call's arguments come under (Llama 3.x writes "parameters").
_ARGUMENT_KEYS = ("arguments", "parameters")


def _skip_ws(text: str, pos: int) -> int:
    m = _WS.match(text, pos)
    return m.end() if m else pos


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call_from_object(obj: Any) -> _RawCall | None:
    """`{"name", "arguments" | "parameters"}` (arguments an object, or an object as JSON text)."""
    if not isinstance(obj, dict):
        return None
    if "function" in obj and isinstance(obj["function"], dict):
        return _call_from_object(obj["function"])
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(name, str) or not name or not isinstance(args, dict):
        return None
    return _RawCall(name, args)


def _json_at(text: str, pos: int) -> tuple[Any, int] | None:
    try:
        return _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError:
        return None


def _object_call(text: str, start: int | None) -> tuple[_RawCall, int] | None:
    """The JSON call object at `start` and the offset just past it."""
    decoded = None if start is None else _json_at(text, start)
    if decoded is None:
        return None
    call = _call_from_object(decoded[0])
    return None if call is None else (call, decoded[1])


# Where the JSON object of the call from `pos` begins (its "{"); None until it has.


def _hermes_start(text: str, pos: int) -> int | None:
    at = _skip_ws(text, pos)
    if not text.startswith("<tool_call>", at):
        return None
    at = _skip_ws(text, at + len("<tool_call>"))
    return at if text.startswith("{", at) else None


def _llama3_start(text: str, pos: int) -> int | None:
    """After `<|python_tag|>`, or bare: the answer's first object, or one after `;`."""
    at = _skip_ws(text, pos)
    begun = pos == 0
    if pos > 0 and text.startswith(";", at):
        at, begun = _skip_ws(text, at + 1), True
    if text.startswith(PYTHON_TAG, at):
        at, begun = _skip_ws(text, at + len(PYTHON_TAG)), True
    return at if begun and text.startswith("{", at) else None


def _mistral_start(text: str, pos: int) -> int | None:
    """An object of `[TOOL_CALLS][…]`: the first after `[`, the next ones after `,`."""
    at = _skip_ws(text, pos)
    if text.startswith("[TOOL_CALLS]", at):
        at = _skip_ws(text, at + len("[TOOL_CALLS]"))
        if not text.startswith("[", at):
            return None
        at = _skip_ws(text, at + 1)
    elif pos > 0 and text.startswith(",", at):
        at = _skip_ws(text, at + 1)
    else:
        return None
    return at if text.startswith("{", at) else None


def _hermes(text: str, pos: int, final: bool) -> tuple[list[_RawCall], int] | None:
    """`<tool_call>{"name": …, "arguments": {…}}</tool_call>` (Hermes, Qwen2.5, the fallback)."""
    found = _object_call(text, _hermes_start(text, pos))
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


_QWEN_HEAD = re.compile(r"\s*<tool_call>\s*<function=([^>\n]+)>")
_QWEN_CALL = re.compile(
    r"\s*<tool_call>\s*<function=([^>\n]+)>(.*?)</function>\s*</tool_call>", re.DOTALL
)
_QWEN_PARAM = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)
_GLM_HEAD = re.compile(r"\s*<tool_call>\s*([^<\n]+)(?=[<\n])")
_GLM_CALL = re.compile(r"\s*<tool_call>\s*([^<\n]+?)\s*((?:<arg_key>.*?)?)</tool_call>", re.DOTALL)
_GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


def _params_of(tools: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    props = tools.get(name, {}).get("properties") if isinstance(tools.get(name), dict) else None
    return props if isinstance(props, dict) else {}


def _xml_call(
    call: re.Pattern[str], param: re.Pattern[str], tools: Mapping[str, Any]
) -> Callable[[str, int, bool], tuple[list[_RawCall], int] | None]:
    """An XML-style call: `call` gives the name and the parameters' text, `param` each one."""

    def parse(text: str, pos: int, final: bool) -> tuple[list[_RawCall], int] | None:
        m = call.match(text, pos)
        if m is None:
            return None
        name = m.group(1).strip()
        props = _params_of(tools, name)
        args = {
            k.strip(): _convert_value(v, props.get(k.strip())) for k, v in param.findall(m.group(2))
        }
        return [_RawCall(name, args)], m.end()

    return parse


def _llama3(text: str, pos: int, final: bool) -> tuple[list[_RawCall], int] | None:
    """`<|python_tag|>{"name": …, "parameters": {…}}` or a bare object; several separated by `;`."""
    found = _object_call(text, _llama3_start(text, pos))
    return None if found is None else ([found[0]], found[1])


def _mistral(text: str, pos: int, final: bool) -> tuple[list[_RawCall], int] | None:
    """`[TOOL_CALLS][{"name", "arguments", "id"}, …]` (one call per object), or `[TOOL_CALLS]name[ARGS]{…}`."""
    start = _mistral_start(text, pos)
    if start is not None:
        found = _object_call(text, start)
        if found is None:
            return None
        call, end = found
        after = _skip_ws(text, end)
        if text.startswith("]", after):
            return [call], after + 1
        # A call ends once the list goes on (the next one takes the comma) or the answer ends.
        if text.startswith(",", after) or (final and after == len(text)):
            return [call], end
        return None
    at = _skip_ws(text, pos)
    if not text.startswith("[TOOL_CALLS]", at):
        return None
    at = _skip_ws(text, at + len("[TOOL_CALLS]"))
    marker = text.find("[ARGS]", at)
    if marker < 0 or text.startswith("[", at):
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


# --- a call as it is written ------------------------------------------------------

_STRING_BODY = re.compile(r'[^"\\]*')
_SCALAR_END = frozenset(",}] \t\n\r")


class _ObjectScan:
    """Follows one JSON object as it is written: where each of its own values starts and ends.

    It does not check the JSON (the complete call is decoded anyway); it
    only tracks strings and nesting, reading each character once however the
    text is cut. Only a key's first value is recorded.
    """

    def __init__(self, start: int) -> None:
        self.pos = start + 1  # text[start] is "{"
        self.depth = 1
        self.in_string = False
        # key, key_string, colon, value, string, nested, scalar, next
        self.state = "key"
        self.mark = 0  # where the key being read began
        self.key: str | None = None  # whose value is being read (None: not recorded)
        self.starts: dict[str, int] = {}
        self.ends: dict[str, int] = {}
        self.end: int | None = None  # just past the closing "}"

    def advance(self, text: str) -> None:
        i, n = self.pos, len(text)
        while i < n and self.end is None:
            if self.in_string:
                m = _STRING_BODY.match(text, i)
                i = m.end() if m else i
                if i >= n:
                    break
                if text[i] == "\\":
                    if i + 1 >= n:
                        break  # the escaped character is not here yet
                    i += 2
                    continue
                self.in_string = False
                i += 1
                if self.state == "key_string":
                    key = _loads(text[self.mark : i])
                    self.key = key if isinstance(key, str) and key not in self.starts else None
                    self.state = "colon"
                elif self.state == "string":
                    self._value_end(i)
                continue
            c = text[i]
            state = self.state
            if state == "scalar" and c in _SCALAR_END:
                self._value_end(i)
                continue  # the same character again, after the value
            if c == '"':
                self.in_string = True
                if state == "key":
                    self.state, self.mark = "key_string", i
                elif state == "value":
                    self._value_start(i, "string")
            elif state == "scalar":
                pass
            elif c in "{[":
                if state == "value":
                    self._value_start(i, "nested")
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.end = i + 1
                elif self.depth == 1 and state == "nested":
                    self._value_end(i + 1)
            elif state == "nested" or c in " \t\n\r":
                pass
            elif c == ":" and state == "colon":
                self.state = "value"
            elif c == "," and state == "next":
                self.state = "key"
            elif state == "value":
                self._value_start(i, "scalar")
            i += 1
        self.pos = i

    def _value_start(self, at: int, kind: str) -> None:
        self.state = kind
        if self.key is not None:
            self.starts[self.key] = at

    def _value_end(self, at: int) -> None:
        if self.key is not None:
            self.ends[self.key] = at
        self.key = None
        self.state = "next"


class _Progress(ABC):
    """What is known of the call being written: its name, and argument text ready to send."""

    name: str | None = None

    @abstractmethod
    def advance(self, text: str) -> None:
        """Reads what was added to `text` (the calls' text, which only grows)."""

    @abstractmethod
    def could_end(self) -> bool:
        """False while the call surely is not complete yet (then it is not parsed)."""

    @abstractmethod
    def take(self, text: str) -> str:
        """Argument text not taken before (JSON pieces that join into the arguments)."""

    @abstractmethod
    def rest(self, text: str, sent: str, arguments: dict[str, Any]) -> str | None:
        """What completes `sent` (all that was taken) into `arguments`; None if nothing can."""


class _JsonProgress(_Progress):
    """A JSON call object: the name once its string is closed, the arguments' text as it comes."""

    def __init__(self, locate: Callable[[str, int], int | None], pos: int) -> None:
        self.locate = locate
        self.pos = pos
        self.scan: _ObjectScan | None = None
        self.key: str | None = None  # the key the arguments object is under
        self.given = 0  # how far the arguments' text was taken

    def advance(self, text: str) -> None:
        if self.scan is None:
            start = self.locate(text, self.pos)
            if start is None:
                return
            self.scan = _ObjectScan(start)
        scan = self.scan
        scan.advance(text)
        if self.name is None and "name" in scan.ends:
            name = _loads(text[scan.starts["name"] : scan.ends["name"]])
            if isinstance(name, str) and name:
                self.name = name
        if self.key is None:
            # The first of the keys to start; arguments written as a JSON string come at the end.
            starts = scan.starts
            for key in sorted((k for k in _ARGUMENT_KEYS if k in starts), key=starts.__getitem__):
                if text.startswith("{", scan.starts[key]):
                    self.key, self.given = key, scan.starts[key]
                break

    def could_end(self) -> bool:
        return self.scan is None or self.scan.end is not None

    def take(self, text: str) -> str:
        if self.scan is None or self.key is None:
            return ""
        end = self.scan.ends.get(self.key, self.scan.pos)
        piece, self.given = text[self.given : end], end
        return piece

    def rest(self, text: str, sent: str, arguments: dict[str, Any]) -> str | None:
        self.advance(text)
        scan = self.scan
        if scan is None or self.key is None or self.key not in scan.ends:
            return None
        whole = text[scan.starts[self.key] : scan.ends[self.key]]
        if not whole.startswith(sent) or _loads(whole) != arguments:
            return None
        return whole[len(sent) :]


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


class _XmlProgress(_Progress):
    """An XML-style call: the name from its head, then each parameter once it is closed."""

    def __init__(
        self,
        head: re.Pattern[str],
        param: re.Pattern[str],
        close: str,
        stop: str,
        tools: Mapping[str, Any],
        pos: int,
    ) -> None:
        self.head, self.param, self.close, self.stop = head, param, close, stop
        self.tools = tools
        self.pos = pos
        self.body: int | None = None  # where the parameters begin
        self.props: Mapping[str, Any] = {}
        self.at = 0  # just past the last parameter read
        self.stop_at: int | None = None  # the first `stop` after the head: no parameter past it
        self.stop_from = 0  # where to look for `stop` next
        self.close_from = 0  # where to look for a closing tag next
        self.items: list[tuple[str, Any]] = []
        self.given = 0  # how many items were taken

    def advance(self, text: str) -> None:
        if self.body is None:
            m = self.head.match(text, self.pos)
            if m is None:
                return
            self.name = m.group(1).strip()
            self.props = _params_of(self.tools, self.name)
            self.body = self.at = self.stop_from = self.close_from = m.end()
        body = self.body
        if self.stop_at is None:
            found = text.find(self.stop, self.stop_from)
            self.stop_at = found if found >= 0 else None
            self.stop_from = max(body, len(text) - len(self.stop) + 1)
        limit = len(text) if self.stop_at is None else self.stop_at
        # Each parameter is searched for once a closing tag is there to end it.
        while True:
            if text.find(self.close, max(self.at, self.close_from), limit) < 0:
                self.close_from = max(self.at, limit - len(self.close) + 1)
                break
            m = self.param.search(text, self.at, limit)
            if m is None:
                break
            key = m.group(1).strip()
            self.items.append((key, _convert_value(m.group(2), self.props.get(key))))
            self.at = m.end()

    def could_end(self) -> bool:
        return self.body is None or self.stop_at is not None

    def _text(self, items: list[tuple[str, Any]], first: bool) -> str:
        return "".join(
            ("{" if first and i == 0 else ", ") + _dumps(k) + ": " + _dumps(v)
            for i, (k, v) in enumerate(items)
        )

    def take(self, text: str) -> str:
        new = self.items[self.given :]
        piece = self._text(new, self.given == 0)
        self.given = len(self.items)
        return piece

    def rest(self, text: str, sent: str, arguments: dict[str, Any]) -> str | None:
        given = dict(self.items[: self.given])
        if (
            self._text(self.items[: self.given], True) != sent
            or not given.keys() <= arguments.keys()
        ):
            return None
        # A key sent again later wins, as when JSON repeats a key.
        more = [
            (k, v) for k, v in arguments.items() if k not in given or _dumps(given[k]) != _dumps(v)
        ]
        body = self._text(more, not sent)
        return body + "}" if sent or body else "{}"


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
    calls (no tools, or `tool_choice: "none"`). `grammar`: a grammar holds
    every call to the format's syntax from its marker on (the engine's case
    whenever `tools` are given), so a call is sent as it is written: its
    start once the name is known, its arguments as they come. Without it
    each call is held until it is complete and well-formed. A call cut off
    (by max_tokens or a stop sequence) after it was started stays as it is:
    the rest of its text is dropped, not sent as content.
    """

    def __init__(
        self,
        fmt: ToolFormat,
        tools: Mapping[str, Any] | None,
        *,
        new_id: Callable[[], str] | None = None,
        in_reasoning: bool = False,
        grammar: bool = False,
    ) -> None:
        self.fmt = fmt
        self.tools = tools
        self.grammar = grammar
        self.new_id = new_id or (short_call_id if fmt.name == "mistral" else openai_call_id)
        self._buf = ""
        # start, reasoning, content, json, calls; a prompt that opened `<think>` starts in reasoning.
        self._mode = "reasoning" if in_reasoning else "start"
        self._think_done = False
        self._calls_text = ""
        self._calls: list[ToolCall] = []
        self._parsed_to = 0  # end of the last complete call in _calls_text
        # The call being written, from _parsed_to: what is known of it, and what was sent.
        self._progress: _Progress | None = None
        self._open: tuple[str, str] | None = None  # its id and name, once its start was sent
        self._sent: list[str] = []  # its argument pieces sent so far
        schemas = tools or {}
        self.call_syntax: Callable[[str, int, bool], tuple[list[_RawCall], int] | None] = {
            "hermes": _hermes,
            "generic": _hermes,
            "qwen3_coder": _xml_call(_QWEN_CALL, _QWEN_PARAM, schemas),
            "glm45": _xml_call(_GLM_CALL, _GLM_ARG, schemas),
            "llama3": _llama3,
            "mistral": _mistral,
        }[fmt.name]
        self._new_progress: Callable[[int], _Progress] = {
            "hermes": lambda pos: _JsonProgress(_hermes_start, pos),
            "generic": lambda pos: _JsonProgress(_hermes_start, pos),
            "qwen3_coder": lambda pos: _XmlProgress(
                _QWEN_HEAD, _QWEN_PARAM, "</parameter>", "</function>", schemas, pos
            ),
            "glm45": lambda pos: _XmlProgress(
                _GLM_HEAD, _GLM_ARG, "</arg_value>", "</tool_call>", schemas, pos
            ),
            "llama3": lambda pos: _JsonProgress(_llama3_start, pos),
            "mistral": lambda pos: _JsonProgress(_mistral_start, pos),
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
                            out += self._complete(raw, "")
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
            if self.grammar and self.fmt.name == "llama3" and head.startswith("{"):
                # The grammar makes an answer that starts with "{" a call: read it as it comes.
                self._buf = ""
                self._calls_text = head
                self._mode = "calls"
                return True
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
            if self._progress is None:
                self._progress = self._new_progress(self._parsed_to)
            self._progress.advance(text)
            if not final and not self._progress.could_end():
                break  # not worth parsing the whole call on every piece
            parsed = self.call_syntax(text, self._parsed_to, final)
            if parsed is None:
                break
            raws, end = parsed
            for raw in raws:
                out += self._complete(raw, text)
            self._parsed_to = end
        if self.grammar and not final:
            self._stream(out, text)
        if final:
            rest = text[self._parsed_to :]
            if self._open is not None:
                pass  # a call cut off once started: what it had is out, the rest is dropped
            elif not self._calls:
                if rest:
                    out.append(ContentDelta(rest))  # not a call after all
            elif rest.strip():
                out.append(ContentDelta(rest.strip()))
            self._calls_text = ""
            self._parsed_to = 0
            self._progress, self._open, self._sent = None, None, []

    def _stream(self, out: list[ParseEvent], text: str) -> None:
        """Sends what is new of the call being written: its start, then its arguments."""
        progress = self._progress
        if progress is None:
            return
        index = len(self._calls)
        if self._open is None:
            if progress.name is None:
                return
            self._open = (self.new_id(), progress.name)
            out.append(CallStart(index, *self._open))
        piece = progress.take(text)
        if piece:
            self._sent.append(piece)
            out.append(ArgsDelta(index, piece))

    def _complete(self, raw: _RawCall, text: str) -> list[ParseEvent]:
        """The events that finish a complete call: its start unless sent, its arguments' rest, its end."""
        index = len(self._calls)
        arguments = _dumps(raw.arguments)
        events: list[ParseEvent] = []
        if self._open is None:
            call_id = self.new_id()
            events.append(CallStart(index, call_id, raw.name))
            rest: str | None = arguments
        else:
            call_id, name = self._open
            sent = "".join(self._sent)
            progress = self._progress
            rest = None if progress is None else progress.rest(text, sent, raw.arguments)
            if rest is None and not sent:
                rest = arguments
            if rest is None or name != raw.name:
                # Only a call the grammar did not hold can end unlike its start.
                log.warning("a streamed tool call ended unlike it began: %s", raw.name)
                rest = rest or ""
        if rest:
            events.append(ArgsDelta(index, rest))
        call = ToolCall(call_id, raw.name, arguments)
        self._calls.append(call)
        events.append(CallEnd(index, call))
        self._progress, self._open, self._sent = None, None, []
        return events


def parse_output(
    fmt: ToolFormat,
    text: str,
    tools: Mapping[str, Any] | None,
    *,
    new_id: Callable[[], str] | None = None,
    in_reasoning: bool = False,
    grammar: bool = False,
) -> ParsedOutput:
    """A whole answer's content, reasoning and tool calls (`grammar` as for StreamParser)."""
    parser = StreamParser(fmt, tools, new_id=new_id, in_reasoning=in_reasoning, grammar=grammar)
    events = parser.feed(text) + parser.finish()
    return collect(events)


def collect(events: list[ParseEvent]) -> ParsedOutput:
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    reasoning = [e.text for e in events if isinstance(e, ReasoningDelta)]
    calls = [e.call for e in events if isinstance(e, CallEnd)]
    return ParsedOutput(content, "".join(reasoning) if reasoning else None, calls)
