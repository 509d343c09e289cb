"""`response_format` to a grammar: an allowlist walk over the schema, then llguidance's compiler.

The walk decides what is supported (docs/api.md, "Structured output"): every
validation keyword must be one the grammar enforces, or the request is refused
with an error naming the keyword and where it sits. Annotations (`title`,
`description`, `examples`...) and `x-` extensions are dropped. The walk also
bounds the schema's size and depth before the compiler sees it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from llguidance import LLMatcher

from engine.errors import PeregrineError

# Keywords the grammar enforces exactly.
SUPPORTED_KEYWORDS = frozenset(
    {
        "type",
        "enum",
        "const",
        # objects
        "properties",
        "required",
        "additionalProperties",
        "patternProperties",
        "minProperties",
        "maxProperties",
        # arrays
        "items",
        "prefixItems",
        "additionalItems",
        "minItems",
        "maxItems",
        # strings
        "minLength",
        "maxLength",
        "pattern",
        "format",
        # numbers
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        # composition and references
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "$defs",
        "definitions",
    }
)

# Keywords that constrain nothing: dropped before compiling.
ANNOTATIONS = frozenset(
    {
        "$schema",
        "$id",
        "$anchor",
        "$comment",
        "$vocabulary",
        "title",
        "description",
        "default",
        "examples",
        "deprecated",
        "readOnly",
        "writeOnly",
        "contentMediaType",
        "contentEncoding",
        # OpenAPI's hint for tagged unions (pydantic writes it): the union itself is enforced.
        "discriminator",
    }
)

FORMATS = frozenset(
    {
        "date-time",
        "date",
        "time",
        "duration",
        "email",
        "hostname",
        "ipv4",
        "ipv6",
        "uuid",
        "uri",
    }
)

JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})

# Bounds on what a request may ask the compiler to build.
MAX_DEPTH = 64
MAX_NODES = 5000

# Where a value is a map of names to subschemas, a list of subschemas, or one subschema.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions"})
_SCHEMA_LISTS = frozenset({"anyOf", "oneOf", "allOf", "prefixItems"})
_SCHEMA_ONE = frozenset({"additionalProperties", "additionalItems"})

# Separators as models usually write them; whitespace between tokens bounded as
# llama.cpp's JSON grammar does, so a small model cannot pad an answer forever.
COMPILE_OPTIONS: Any = {  # llguidance's JsonCompileOptions (a TypedDict in its stubs only)
    "whitespace_flexible": True,
    "whitespace_pattern": r"(?: |\n[ \t]{0,20})?",
    "item_separator": ",",
    "key_separator": ":",
    # Never fall back to ignoring a keyword the compiler does not implement.
    "lenient": False,
    "coerce_one_of": False,
}


class SchemaError(PeregrineError):
    """A response_format the engine cannot enforce; `param` names the field at fault."""

    def __init__(self, message: str, param: str = "response_format") -> None:
        super().__init__(message)
        self.param = param


def _where(path: tuple[str, ...]) -> str:
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in path) if path else "#"


class _Walk:
    def __init__(self) -> None:
        self.nodes = 0

    def schema(self, node: Any, path: tuple[str, ...]) -> Any:
        """A cleaned copy of one (sub)schema: booleans stay, objects keep enforced keywords."""
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise SchemaError(f"the schema is too large (more than {MAX_NODES} subschemas)")
        if len(path) > MAX_DEPTH * 2:
            raise SchemaError(f"the schema is nested too deeply (at {_where(path[:12])}…)")
        if isinstance(node, bool):
            return node
        if not isinstance(node, dict):
            raise SchemaError(
                f"the schema at {_where(path)} must be an object or a boolean, "
                f"not {type(node).__name__}"
            )
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in ANNOTATIONS or key.startswith("x-"):
                continue
            if key not in SUPPORTED_KEYWORDS:
                raise SchemaError(
                    f"JSON schema keyword '{key}' (at {_where(path)}) is not supported: "
                    "the grammar could not enforce it"
                )
            out[key] = self.keyword(key, value, (*path, key))
        return out

    def keyword(self, key: str, value: Any, path: tuple[str, ...]) -> Any:
        if key in _SCHEMA_MAPS:
            if not isinstance(value, dict):
                raise SchemaError(f"'{key}' at {_where(path)} must be an object")
            return {name: self.schema(sub, (*path, name)) for name, sub in value.items()}
        if key in _SCHEMA_LISTS:
            if not isinstance(value, list) or not value:
                raise SchemaError(f"'{key}' at {_where(path)} must be a non-empty array")
            return [self.schema(sub, (*path, str(i))) for i, sub in enumerate(value)]
        if key in _SCHEMA_ONE:
            return self.schema(value, path)
        if key == "items":
            if isinstance(value, list):  # draft-04 tuples
                return [self.schema(sub, (*path, str(i))) for i, sub in enumerate(value)]
            return self.schema(value, path)
        if key == "$ref":
            if not isinstance(value, str) or not value.startswith("#"):
                raise SchemaError(
                    f"'$ref' {value!r} (at {_where(path)}) is not supported: "
                    "only references inside the schema (#/$defs/...) are"
                )
            return value
        if key == "format":
            if value not in FORMATS:
                raise SchemaError(
                    f"JSON schema format {value!r} (at {_where(path)}) is not supported; "
                    f"supported: {', '.join(sorted(FORMATS))}"
                )
            return value
        if key == "type":
            types = value if isinstance(value, list) else [value]
            if not types or any(t not in JSON_TYPES for t in types):
                raise SchemaError(f"'type' at {_where(path)} has an unknown type: {value!r}")
            return value
        if key == "required":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SchemaError(f"'required' at {_where(path)} must be an array of names")
            return value
        if key == "enum" and (not isinstance(value, list) or not value):
            raise SchemaError(f"'enum' at {_where(path)} must be a non-empty array")
        return value


def check_schema(schema: Any) -> Any:
    """The schema without annotations, or SchemaError naming the first unsupported keyword."""
    return _Walk().schema(schema, ())


def grammar_for(response_format: Mapping[str, Any]) -> str | None:
    """The llguidance grammar a response_format asks for (None for plain text).

    Raises SchemaError for a schema outside what is supported, or one the
    compiler refuses (its message says why).
    """
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    param = "response_format"
    if kind == "json_object":
        # llama-server also takes a schema here; OpenAI's json_object is any object.
        schema: Any = response_format.get("schema") or {"type": "object"}
        param = "response_format.schema"
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise SchemaError(
                "response_format 'json_schema' needs 'json_schema': {'name', 'schema'}",
                "response_format.json_schema",
            )
        schema = spec["schema"]
        param = "response_format.json_schema.schema"
    else:
        raise SchemaError(
            f"response_format type {kind!r} is not supported (text, json_object or json_schema)",
            "response_format.type",
        )
    try:
        cleaned = check_schema(schema)
    except SchemaError as exc:
        raise SchemaError(str(exc), param) from None
    except RecursionError:
        raise SchemaError("the schema is nested too deeply", param) from None
    grammar = LLMatcher.grammar_from_json_schema(json.dumps(cleaned), overrides=COMPILE_OPTIONS)
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        reason = " ".join((messages[0] if messages else "invalid schema").split())[:300]
        raise SchemaError(f"the schema cannot be compiled to a grammar: {reason}", param)
    return grammar
