"""The schema walk and the wire lists, without a model: what is supported, refused, ignored."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engine.backend.llama import DecodeError
from engine.serving.serve_cli import check_jinja2
from engine.serving.server import _api_error_for
from engine.structured.schema import MAX_NODES, SchemaError, check_schema, grammar_for
from engine.wire.openai import IGNORED_FIELDS, REFUSED_FIELDS, refused_field


def compile_schema(schema: Any) -> str | None:
    return grammar_for({"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "string"}}, "not"),
        ({"if": {"type": "string"}, "then": {"minLength": 1}}, "if"),
        ({"type": "array", "contains": {"type": "integer"}}, "contains"),
        ({"type": "object", "propertyNames": {"pattern": "^a"}}, "propertyNames"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
        ({"type": "object", "unevaluatedProperties": False}, "unevaluatedProperties"),
        ({"properties": {"a": {"type": "integer", "maxContains": 2}}}, "maxContains"),
        ({"$defs": {"x": {"nullable": True}}, "$ref": "#/$defs/x"}, "nullable"),
        ({"type": "string", "format": "credit-card"}, "credit-card"),
        ({"$ref": "https://example.com/schema.json"}, "https://example.com/schema.json"),
    ],
)
def test_unsupported_keywords_are_refused_by_name(schema: dict[str, Any], keyword: str) -> None:
    with pytest.raises(SchemaError) as info:
        compile_schema(schema)
    assert keyword in str(info.value)
    assert info.value.param == "response_format.json_schema.schema"


def test_where_the_keyword_sits_is_named() -> None:
    with pytest.raises(SchemaError, match="#/properties/tags/items"):
        check_schema({"properties": {"tags": {"items": {"not": {}}}}})


def test_annotations_are_dropped_and_names_that_look_like_keywords_kept() -> None:
    schema = {
        "title": "T",
        "description": "d",
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "x-order": 3,
        "type": "object",
        "properties": {"not": {"type": "string", "examples": ["a"]}, "title": {"type": "integer"}},
        "required": ["not", "title"],
    }
    assert check_schema(schema) == {
        "type": "object",
        "properties": {"not": {"type": "string"}, "title": {"type": "integer"}},
        "required": ["not", "title"],
    }


def test_schemas_the_compiler_refuses_are_schema_errors() -> None:
    with pytest.raises(SchemaError, match="minimum"):
        compile_schema({"type": "integer", "minimum": 5, "maximum": 2})
    with pytest.raises(SchemaError, match="regex"):
        compile_schema({"type": "string", "pattern": "(("})
    with pytest.raises(SchemaError, match="type"):
        compile_schema({"type": "decimal"})
    with pytest.raises(SchemaError, match="must be an object"):
        compile_schema([1, 2])


def test_huge_and_deep_schemas_are_refused_before_compiling() -> None:
    wide = {
        "type": "object",
        "properties": {f"p{i}": {"type": "integer"} for i in range(MAX_NODES)},
    }
    with pytest.raises(SchemaError, match="too large"):
        compile_schema(wide)
    deep: dict[str, Any] = {"type": "integer"}
    for _ in range(200):
        deep = {"type": "array", "items": deep}
    with pytest.raises(SchemaError, match="nested too deeply"):
        compile_schema(deep)


def test_json_object_and_text_formats() -> None:
    assert grammar_for({"type": "text"}) is None
    grammar = grammar_for({"type": "json_object"})
    assert grammar is not None and '"object"' in grammar
    with pytest.raises(SchemaError) as info:
        grammar_for({"type": "json_schema"})
    assert info.value.param == "response_format.json_schema"


def test_a_schema_cannot_loosen_the_compiler_options() -> None:
    # llguidance reads options from "x-guidance" ("lenient" ignores unknown keywords):
    # the walk drops x- keys, and the engine's options win anyway.
    loose = {"type": "array", "uniqueItems": True, "x-guidance": {"lenient": True}}
    with pytest.raises(SchemaError, match="uniqueItems"):
        compile_schema(loose)
    grammar = compile_schema({"type": "integer", "x-guidance": {"lenient": True}})
    assert grammar is not None and "lenient" in grammar and '"lenient":true' not in grammar


def test_refused_fields_no_ops_and_routes() -> None:
    assert set(REFUSED_FIELDS) >= {
        "n",
        "best_of",
        "echo",
        "suffix",
        "audio",
        "modalities",
        "prediction",
        "web_search_options",
    }
    # Tool calling is served now: neither field is refused (tests/test_tool_calling.py).
    assert not {"tools", "tool_choice"} & set(REFUSED_FIELDS)
    no_ops = {"n": 1, "modalities": ["text"], "audio": None}
    assert refused_field(no_ops, "chat") is None
    assert refused_field({"echo": False, "suffix": "", "best_of": 1}, "completions") is None
    assert refused_field({"n": 2}, "chat") == (
        "n",
        "'n' is not supported: one completion per request",
    )
    assert refused_field({"n": True}, "chat") is not None  # True is not the number 1
    assert refused_field({"echo": True}, "completions") is not None
    assert refused_field({"echo": True}, "chat") is None  # not an OpenAI chat field
    assert not IGNORED_FIELDS & set(REFUSED_FIELDS)


def test_decode_failures_are_500() -> None:
    error = _api_error_for(DecodeError("llama_decode failed (-3)"))
    assert error.status == 500 and error.type == "server_error"
    assert json.dumps(error.body())


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("3.1.6", True),
        ("3.2.0", True),
        ("4.0", True),
        ("3.1.5", False),
        ("3.0.3", False),
        ("3.1.6rc1", True),
        ("2.11.3", False),
    ],
)
def test_jinja2_floor(version: str, ok: bool) -> None:
    if ok:
        check_jinja2(version)
    else:
        with pytest.raises(Exception, match="CVE-2024-56326"):
            check_jinja2(version)
