"""A chat's tools without Qt: checking them, storing them and their calls, the request.

SQLite files throughout; the schema migration starts from a database written
with the first schema, byte for byte as earlier versions created it.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from app.services.chat.service import ChatService, ChatServiceError
from app.services.chat.store import SCHEMA_VERSION, ChatStore, ChatStoreUnavailable
from app.services.chat.tools import (
    EXAMPLE,
    ToolSpecError,
    check_settings,
    parse_tools,
    pretty,
    summary,
)
from app.services.engine.client import Finished

# The first schema (no tools), as earlier versions of the app created it.
SCHEMA_V0 = """
CREATE TABLE IF NOT EXISTS chats (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    preset TEXT NOT NULL DEFAULT 'Balanced',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT 'complete',
    meta TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_chat ON messages(chat_id, id);
"""

WEATHER_CALL = {
    "id": "call_abc",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'},
}


def tool(name: str, parameters: Any = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "description": f"{name} tool"}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def old_database(path: Path) -> None:
    db = sqlite3.connect(str(path))
    db.executescript(SCHEMA_V0)
    db.execute(
        "INSERT INTO chats(title, system_prompt, preset, created_at, updated_at)"
        " VALUES ('Old chat', 'Be brief.', 'Precise', 1.0, 2.0)"
    )
    rows = [
        ("user", "Hello", "complete", "{}"),
        ("assistant", "Hi there", "complete", '{"finish_reason": "stop"}'),
        ("user", "More?", "complete", "{}"),
        ("assistant", "cut", "interrupted", '{"error": "engine died"}'),
        ("user", "deleted later", "complete", "{}"),
    ]
    for role, content, status, meta in rows:
        db.execute(
            "INSERT INTO messages(chat_id, role, content, status, meta, created_at)"
            " VALUES (1, ?, ?, ?, ?, 3.0)",
            (role, content, status, meta),
        )
    db.execute("DELETE FROM messages WHERE id=5")  # AUTOINCREMENT remembers id 5
    db.commit()
    db.close()


def test_an_old_database_is_migrated_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    old_database(path)
    store = ChatStore(path)
    chat = store.chat(1)
    assert (chat.title, chat.system_prompt, chat.preset) == ("Old chat", "Be brief.", "Precise")
    assert (chat.created_at, chat.updated_at) == (1.0, 2.0)
    assert (chat.tools, chat.tools_enabled, chat.tool_choice) == ("", False, "auto")
    messages = store.messages(1)
    assert [(m.id, m.role, m.content, m.status) for m in messages] == [
        (1, "user", "Hello", "complete"),
        (2, "assistant", "Hi there", "complete"),
        (3, "user", "More?", "complete"),
        (4, "assistant", "cut", "interrupted"),
    ]
    assert messages[1].meta == {"finish_reason": "stop"}
    assert messages[3].meta == {"error": "engine died"}
    assert all(m.tool_calls == [] and m.tool_call_id == "" for m in messages)
    # The new roles and columns work, and a deleted message's id is never reused.
    added = store.add_message(1, "assistant", "", status="streaming")
    assert added.id == 6
    store.finish_message(added.id, "complete", {}, [WEATHER_CALL])
    result = store.add_message(1, "tool", "Sunny", tool_call_id="call_abc")
    assert store.message(result.id).role == "tool"
    # Deleting a chat still deletes its messages (the foreign key survived the rebuild).
    store.delete_chat(1)
    assert store.messages(1) == []
    store.close()
    db = sqlite3.connect(str(path))
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    db.close()
    # Opening it again migrates nothing and changes nothing.
    again = ChatStore(path)
    assert again.list_chats() == []
    again.close()


def test_a_database_from_a_newer_version_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    ChatStore(path).close()
    db = sqlite3.connect(str(path))
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(ChatStoreUnavailable, match="newer Peregrine"):
        ChatStore.open_or_recover(path)
    assert path.exists()  # not moved aside: it is not damaged
    assert not list(tmp_path.glob("*.damaged-*"))


def test_tools_calls_and_results_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    store = ChatStore(path)
    service = ChatService(store)
    chat = service.new_chat()
    service.set_tools(chat.id, EXAMPLE, True, "function:get_weather")
    gen = service.send(chat.id, "Weather in Paris?")
    service.on_finished(gen.id, Finished("tool_calls", tool_calls=(WEATHER_CALL,)))
    answer = store.messages(chat.id)[-1]
    assert service.send_tool_result(answer.id, "call_abc", '{"sky": "sunny"}') is not None
    store.close()

    reopened = ChatStore(path)
    chat = reopened.chat(chat.id)
    assert (chat.tools, chat.tools_enabled, chat.tool_choice) == (
        EXAMPLE,
        True,
        "function:get_weather",
    )
    roles = [(m.role, m.tool_calls, m.tool_call_id) for m in reopened.messages(chat.id)]
    assert roles == [
        ("user", [], ""),
        ("assistant", [WEATHER_CALL], ""),
        ("tool", [], "call_abc"),
        ("assistant", [], ""),  # the continuation, cut off by the "restart"
    ]
    # The history goes back to the engine in OpenAI's shape.
    assert ChatService(reopened).payload(chat.id) == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"sky": "sunny"}'},
    ]
    reopened.close()


def test_the_request_carries_the_tools_and_the_choice(tmp_path: Path) -> None:
    store = ChatStore(tmp_path / "chats.sqlite3")
    service = ChatService(store, max_tokens=32)
    chat = service.new_chat(preset="Precise")
    tools = [tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}})]
    text = json.dumps(tools)

    # Saved but off: nothing is sent.
    service.set_tools(chat.id, text, False, "required")
    gen = service.send(chat.id, "Hi")
    assert gen.params == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 32}
    service.on_finished(gen.id, Finished("stop"))

    service.set_tools(chat.id, text, True, "required")
    gen = service.regenerate(chat.id)
    assert gen.params["tools"] == tools
    assert gen.params["tool_choice"] == "required"
    service.on_finished(gen.id, Finished("tool_calls", tool_calls=(WEATHER_CALL,)))

    service.set_tools(chat.id, text, True, "function:get_weather")
    gen = service.regenerate(chat.id)
    assert gen.params["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    calls = (WEATHER_CALL, {**WEATHER_CALL, "id": "call_two"})
    service.on_finished(gen.id, Finished("tool_calls", tool_calls=calls))
    answer = store.messages(chat.id)[-1]
    assert answer.tool_calls == list(calls)

    # Two calls: the answer goes on once both have their results, in call order.
    with pytest.raises(ChatServiceError, match="type the tool's result"):
        service.send_tool_result(answer.id, "call_abc", "  ")
    with pytest.raises(ChatServiceError, match="not in this chat"):
        service.send_tool_result(answer.id, "call_nope", "x")
    assert service.send_tool_result(answer.id, "call_two", "second") is None
    # Regenerating the calls drops them with the result given so far.
    gen = service.regenerate(chat.id)
    assert [m["role"] for m in gen.messages] == ["user"]
    assert [m.role for m in store.messages(chat.id)] == ["user", "assistant"]
    service.on_finished(gen.id, Finished("tool_calls", tool_calls=calls))
    answer = store.messages(chat.id)[-1]
    assert service.send_tool_result(answer.id, "call_two", "second") is None
    with pytest.raises(ChatServiceError, match="already has its result"):
        service.send_tool_result(answer.id, "call_two", "again")
    cont = service.send_tool_result(answer.id, "call_abc", "first")
    assert cont is not None
    # After a result the model answers freely: a forced call again would loop.
    assert cont.params["tool_choice"] == "auto" and cont.params["tools"] == tools
    assert [m["role"] for m in cont.messages] == ["user", "assistant", "tool", "tool"]
    assert cont.messages[1]["tool_calls"] == list(calls)
    assert [m.get("tool_call_id") for m in cont.messages[2:]] == ["call_two", "call_abc"]
    service.on_delta(cont.id, "It is sunny.")
    service.on_finished(cont.id, Finished("stop"))

    # Regenerating that answer keeps the call and its results.
    again = service.regenerate(chat.id)
    assert [m["role"] for m in again.messages] == ["user", "assistant", "tool", "tool"]
    service.request_stop()
    service.on_finished(again.id, Finished("cancelled", tool_calls=(WEATHER_CALL,)))
    # A stopped answer's calls may be cut short: none are kept.
    assert store.messages(chat.id)[-1].tool_calls == []
    store.close()


def test_calls_the_user_went_past_are_not_sent(tmp_path: Path) -> None:
    store = ChatStore(tmp_path / "chats.sqlite3")
    service = ChatService(store)
    chat = service.new_chat()
    service.set_tools(chat.id, EXAMPLE, True, "auto")
    gen = service.send(chat.id, "Weather?")
    service.on_delta(gen.id, "Let me check.")
    service.on_finished(gen.id, Finished("tool_calls", tool_calls=(WEATHER_CALL,)))
    answer = store.messages(chat.id)[-1]
    # The user asks something else instead of giving the result.
    gen = service.send(chat.id, "Never mind, tell me a joke.")
    assert gen.messages == [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check."},
        {"role": "user", "content": "Never mind, tell me a joke."},
    ]
    service.on_finished(gen.id, Finished("stop"))
    with pytest.raises(ChatServiceError, match="gone on since"):
        service.send_tool_result(answer.id, "call_abc", "late")
    store.close()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[{"type": "function", "function": {"name": "a"}', "not valid JSON: .* line 1, column"),
        ('{"type": "function"}', "must be a list: put the tool in square brackets"),
        ("[1]", "Tool 1 must be an object, not a number"),
        ('[{"function": {"name": "a"}}]', 'needs "type": "function"'),
        ('[{"type": "function", "function": {"name": "a b"}}]', 'name of 1 to 64 .*"a b"'),
        (json.dumps([tool("a"), tool("a")]), r"Tool 2 \(a\): another tool has the same name"),
        (json.dumps([tool("a", {"type": "array"})]), 'must have "type": "object"'),
        (
            json.dumps([tool("a", {"type": "object", "properties": {"x": {"type": "strin"}}})]),
            r"Tool 1 \(a\): parameters is not a valid JSON Schema at properties/x/type",
        ),
        (
            json.dumps([tool("a", {"type": "object", "dependentSchemas": {}})]),
            "'dependentSchemas' .* is not supported",
        ),
    ],
)
def test_bad_tools_are_refused_with_a_message_that_says_where(text: str, message: str) -> None:
    with pytest.raises(ToolSpecError, match=message):
        parse_tools(text)


def test_a_refused_setting_changes_nothing(tmp_path: Path) -> None:
    store = ChatStore(tmp_path / "chats.sqlite3")
    service = ChatService(store)
    chat = service.new_chat()
    service.set_tools(chat.id, EXAMPLE, True, "auto")
    with pytest.raises(ToolSpecError, match="not valid JSON"):
        service.set_tools(chat.id, EXAMPLE[:-3], True, "auto")
    with pytest.raises(ToolSpecError, match="needs a tool named get_time"):
        service.set_tools(chat.id, EXAMPLE, True, "function:get_time")
    with pytest.raises(ToolSpecError, match="at least one tool"):
        service.set_tools(chat.id, "", True, "auto")
    with pytest.raises(ToolSpecError, match="Unknown tool choice"):
        check_settings(EXAMPLE, True, "sometimes")
    saved = store.chat(chat.id)
    assert (saved.tools, saved.tools_enabled, saved.tool_choice) == (EXAMPLE, True, "auto")
    # Clearing the tools (off) is allowed.
    service.set_tools(chat.id, "", False, "auto")
    assert store.chat(chat.id).tools == ""
    store.close()


def test_summaries_and_pretty_arguments() -> None:
    assert summary('{"city": "Paris", "days": 3}') == 'city: "Paris", days: 3'
    long = summary(json.dumps({"text": "x" * 200}))
    assert len(long) == 80 and long.endswith("…")
    assert summary("not json") == "not json"
    assert pretty('{"a": [1, 2]}') == '{\n  "a": [\n    1,\n    2\n  ]\n}'
    assert pretty("plain words") == "plain words"
