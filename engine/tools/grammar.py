"""Grammars that hold tool calls to the tools' schemas (llguidance's Lark dialect).

- `required` and a named function: the answer is one call (or, with
  `parallel_tool_calls`, several) from its first token.
- `auto`: free text until the model writes the call marker; from there a lazy
  lexeme hands over to the call's grammar (llguidance's `[lazy]`, its form
  of llama.cpp's lazy grammar triggers), so a call the model starts is always
  complete and valid. Formats whose calls may be a bare JSON object (Llama
  3.x) also turn the grammar on when the answer starts with `{`. A marker
  that is a control token may not be spelt out in the free text either, so
  every call marker in the answer opens a call the grammar holds (the
  parser relies on it to stream calls as they are written).
- `none`: no grammar.

Arguments are compiled with the same allowlist as `response_format`
(engine/structured/schema.py): a tool schema the grammar could not enforce
is refused with a 400 naming the keyword, never loosened.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from llguidance import LLMatcher

from engine.structured.schema import SchemaError, check_schema
from engine.tools.formats import ToolFormat


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict[str, Any]  # a JSON schema for the arguments object


ChoiceMode = Literal["none", "auto", "required"]

# Strings the XML formats write raw; anything else goes as JSON.
_TEXT_VALUE = "/(.|\\n)*/"


def checked_parameters(tools: Sequence[Tool], param: str = "tools") -> list[Tool]:
    """The tools with their schemas cleaned by the allowlist walk; SchemaError names the field."""
    out = []
    for i, tool in enumerate(tools):
        where = f"{param}.{i}.function.parameters"
        try:
            cleaned = check_schema(tool.parameters)
        except SchemaError as exc:
            raise SchemaError(f"tool {tool.name!r}: {exc}", where) from None
        except RecursionError:
            raise SchemaError(
                f"tool {tool.name!r}: the schema is nested too deeply", where
            ) from None
        if not isinstance(cleaned, dict) or cleaned.get("type", "object") != "object":
            raise SchemaError(
                f"tool {tool.name!r}: parameters must be a JSON schema of type 'object'", where
            )
        out.append(Tool(tool.name, tool.description, cleaned))
    return out


def _lit(text: str) -> str:
    return json.dumps(text)


class _Builder:
    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.rules: list[str] = []
        self.n = 0

    def marker(self, text: str) -> str:
        return text if text in self.fmt.special else _lit(text)

    def rule(self, body: str, attrs: str = "") -> str:
        self.n += 1
        name = f"r{self.n}"
        self.rules.append(f"{name}{attrs}: {body}")
        return name

    def json(self, schema: Any) -> str:
        return "%json " + json.dumps(schema)

    # One call, after its trigger, per format.
    def call(self, tools: Sequence[Tool]) -> str:
        name = self.fmt.name
        if name in ("hermes", "generic"):
            body = self.json(_any_of([_call_schema(t, "arguments") for t in tools]))
            return self.rule(f"WS {body} WS {self.marker('</tool_call>')}")
        if name == "llama3":
            return self.rule(self.json(_any_of([_call_schema(t, "parameters") for t in tools])))
        if name == "mistral":
            item = _any_of([_call_schema(t, "arguments", with_id=True) for t in tools])
            return self.rule(self.json({"type": "array", "items": item, "minItems": 1}))
        if name == "qwen3_coder":
            alts = []
            for t in tools:
                params = self.params(
                    t, lambda k: f'"<parameter={k}>\\n"', "\n</parameter>", '"\\n"'
                )
                alts.append(f'"<function={t.name}>\\n" {params} "</function>\\n"')
            return self.rule(f"WS ({' | '.join(alts)}) {self.marker('</tool_call>')}")
        # glm45
        alts = []
        for t in tools:
            params = self.params(
                t, lambda k: f'"<arg_key>{k}</arg_key>\\n<arg_value>"', "</arg_value>", '"\\n"'
            )
            alts.append(f'"{t.name}\\n" {params}')
        return self.rule(f"({' | '.join(alts)}) {self.marker('</tool_call>')}")

    def params(self, tool: Tool, opening: Any, closing: str, sep: str) -> str:
        """The parameters of an XML-style call, in schema order; optional ones may be left out."""
        props = tool.parameters.get("properties") or {}
        required = set(tool.parameters.get("required") or [])
        parts = []
        for key, schema in props.items():
            value = self.value(schema, closing)
            item = f"{opening(key)} {value} {sep}"
            parts.append(item if key in required else f"({item})?")
        return " ".join(parts) if parts else '""'

    def value(self, schema: Any, closing: str) -> str:
        """A parameter's value up to and including its closing tag."""
        if _plain_string(schema):
            # Raw text up to the first closing tag (a lazy lexeme stops there).
            return self.rule(f"{_TEXT_VALUE} {_lit(closing)}", "[lazy]")
        return f"{self.json(schema)} {_lit(closing)}"


def _plain_string(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "string" and set(schema) <= {"type"}


def _any_of(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _call_schema(tool: Tool, args_key: str, *, with_id: bool = False) -> dict[str, Any]:
    props: dict[str, Any] = {"name": {"const": tool.name}, args_key: tool.parameters}
    required = ["name", args_key]
    if with_id:
        props["id"] = {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}
        required.append("id")
    return {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }


def _regex_literal(text: str) -> str:
    """`text` as a literal inside a Lark `/…/` regex."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$/" else c for c in text)


def _free_text(regex: str, fmt: ToolFormat) -> str:
    """A free-text lexeme that never contains the text of the format's control-token markers."""
    spelt = [f" & ~/(.|\\n)*{_regex_literal(t)}(.|\\n)*/" for t in sorted(fmt.special)]
    return regex + "".join(spelt)


def tool_grammar(
    fmt: ToolFormat,
    tools: Sequence[Tool],
    mode: ChoiceMode,
    *,
    parallel: bool = True,
) -> str | None:
    """The llguidance grammar for a tool_choice over `tools` (already checked), or None."""
    if mode == "none" or not tools:
        return None
    b = _Builder(fmt)
    call = b.call(tools)
    trigger = b.marker(fmt.triggers[0])
    if fmt.name == "llama3":
        first = call  # Llama 3.x writes a bare JSON object
        more = f"(WS {_lit(';')} WS {call})*" if parallel else ""
    elif fmt.name == "mistral":
        first = f"{trigger} {call}"
        more = ""  # one list holds every call
    else:
        first = f"{trigger} {call}"
        more = f"(WS {trigger} {call})*" if parallel else ""
    calls = b.rule(f"{first} {more}".strip())
    if mode == "required":
        start = f"WS {calls}"
    else:
        # Llama 3.x: text before the tag must not start with "{" either (that is a call).
        text = "TEXT_PLAIN" if fmt.name == "llama3" else "TEXT_ANY"
        pre = b.rule(f"{text} {_lit(fmt.triggers[0])}", "[lazy]")
        if fmt.triggers[0] in fmt.special:
            pre = b.rule(f"{text} {trigger}")
        if fmt.name == "mistral":
            tail = call
        elif fmt.name == "llama3":
            tail = f"{call} {more}".strip()
            start = f"TEXT_PLAIN | WS {calls} | {pre} {tail}"
        else:
            tail = f"{call} {more}".strip()
        if fmt.name != "llama3":
            start = f"TEXT | {pre} {tail}"
    lark = "\n".join(
        [
            "%llguidance {}",
            f"start: {start}",
            *b.rules,
            r"WS: /[ \n]*/",
            "TEXT: " + _free_text(r"/(.|\n)*/", fmt),
            "TEXT_ANY: " + _free_text(r"/(.|\n)*/", fmt),
            # Llama 3.x auto: plain text never starts with "{" (that is a call).
            "TEXT_PLAIN: " + _free_text(r"/([ \n]*[^{ \n](.|\n)*)?/", fmt),
        ]
    )
    grammar = LLMatcher.grammar_from_lark(lark)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        reason = " ".join((messages[0] if messages else "invalid grammar").split())[:300]
        raise SchemaError(f"the tools cannot be compiled to a grammar: {reason}", "tools")
    return grammar
