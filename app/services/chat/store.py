"""Chats and their messages in SQLite (WAL), saved token by token as answers stream.

Every appended delta is committed at once. In WAL mode with synchronous=NORMAL a
commit is one append to the WAL file without fsync, so it costs microseconds and
a crash of the app or the engine loses at most the token in flight. (A power cut
may lose the last commits; that is the trade WAL/NORMAL makes.)
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.errors import PeregrineError

Role = Literal["system", "user", "assistant", "tool"]
# streaming: being written; complete: the model finished; stopped: the user
# stopped it; interrupted: the engine or the app died; error: nothing usable.
Status = Literal["streaming", "complete", "stopped", "interrupted", "error"]

# The schema's version is SQLite's user_version. 0: the first schema (no tools);
# 1: a chat's tools (JSON text, on/off, tool_choice), and messages with role
# "tool", an assistant's tool_calls (OpenAI's shape, JSON) and a result's
# tool_call_id. Older files are migrated at open (_migrate).
SCHEMA_VERSION = 1

_MESSAGES_TABLE = """
CREATE TABLE {name} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT 'complete',
    meta TEXT NOT NULL DEFAULT '{{}}',
    created_at REAL NOT NULL,
    tool_calls TEXT NOT NULL DEFAULT '[]',
    tool_call_id TEXT NOT NULL DEFAULT ''
);
"""

_SCHEMA = (
    """
CREATE TABLE chats (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    preset TEXT NOT NULL DEFAULT 'Balanced',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    tools TEXT NOT NULL DEFAULT '',
    tools_enabled INTEGER NOT NULL DEFAULT 0,
    tool_choice TEXT NOT NULL DEFAULT 'auto'
);
"""
    + _MESSAGES_TABLE.format(name="messages")
    + """
CREATE INDEX messages_by_chat ON messages(chat_id, id);
"""
)

# Version 0 to 1. SQLite cannot change a CHECK constraint in place, so messages
# is rebuilt (SQLite's documented ALTER TABLE procedure) in one transaction:
# a failure leaves the file as it was.
_MIGRATE_0_TO_1 = (
    """
ALTER TABLE chats ADD COLUMN tools TEXT NOT NULL DEFAULT '';
ALTER TABLE chats ADD COLUMN tools_enabled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE chats ADD COLUMN tool_choice TEXT NOT NULL DEFAULT 'auto';
"""
    + _MESSAGES_TABLE.format(name="messages_v1")
    + """
INSERT INTO messages_v1(id, chat_id, role, content, status, meta, created_at)
    SELECT id, chat_id, role, content, status, meta, created_at FROM messages;
DROP TABLE messages;
ALTER TABLE messages_v1 RENAME TO messages;
CREATE INDEX messages_by_chat ON messages(chat_id, id);
"""
)


class ChatStoreError(PeregrineError):
    """A chat or message that does not exist, or input the store refuses."""


ToolChoice = str  # "auto", "required", "none", or "function:NAME" (one named tool)


@dataclass(frozen=True)
class Chat:
    """One conversation's header."""

    id: int
    title: str
    system_prompt: str
    preset: str
    created_at: float
    updated_at: float
    # The chat's OpenAI function tools as the user wrote them (JSON text, validated
    # by app.services.chat.tools before it is saved), whether they are sent, and
    # tool_choice.
    tools: str = ""
    tools_enabled: bool = False
    tool_choice: ToolChoice = "auto"


@dataclass(frozen=True)
class Message:
    """One message as stored."""

    id: int
    chat_id: int
    role: Role
    content: str
    status: Status
    created_at: float
    meta: dict[str, Any] = field(default_factory=dict)
    # An assistant's calls, in OpenAI's shape ({"id", "type": "function",
    # "function": {"name", "arguments"}}, arguments as JSON text).
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    # A tool message: the id of the call it answers.
    tool_call_id: str = ""


class ChatStoreUnavailable(ChatStoreError):
    """The database could not be read or written (disk full, locked, read-only, damaged)."""

    def __init__(self, message: str, errorname: str = "") -> None:
        super().__init__(message)
        self.errorname = errorname


# SQLite's own names for a file that is not a usable database.
_DAMAGED = {"SQLITE_NOTADB", "SQLITE_CORRUPT"}


def _unavailable(exc: sqlite3.Error, path: Path) -> ChatStoreUnavailable:
    """The plain-words version of a SQLite failure."""
    # Extended names ("SQLITE_IOERR_WRITE") share their primary code's meaning.
    name = "_".join((getattr(exc, "sqlite_errorname", "") or "").split("_")[:2])
    reason = {
        "SQLITE_FULL": "the disk is full",
        "SQLITE_BUSY": "another program holds the chat database (is Peregrine open twice?)",
        "SQLITE_LOCKED": "another program holds the chat database (is Peregrine open twice?)",
        "SQLITE_READONLY": "the chat database is read-only",
        "SQLITE_IOERR": "the disk reported an input/output error",
        "SQLITE_CANTOPEN": "the chat database cannot be opened",
        "SQLITE_NOTADB": "the chat database file is damaged (not a database)",
        "SQLITE_CORRUPT": "the chat database file is damaged",
    }.get(name)
    return ChatStoreUnavailable(f"could not save or read chats ({path}): {reason or exc}", name)


class _Connection:
    """A sqlite3 connection whose failures arrive as ChatStoreUnavailable."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self.db = db
        self.path = path

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self.db.execute(sql, params)
        except sqlite3.DatabaseError as exc:  # not ProgrammingError: that is our bug
            raise _unavailable(exc, self.path) from exc

    def executescript(self, sql: str) -> None:
        try:
            self.db.executescript(sql)
        except sqlite3.DatabaseError as exc:
            raise _unavailable(exc, self.path) from exc

    def __enter__(self) -> _Connection:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_rest: object) -> None:
        try:
            if kind is None:
                self.db.commit()
            else:
                self.db.rollback()
        except sqlite3.DatabaseError as exc:
            raise _unavailable(exc, self.path) from exc

    def close(self) -> None:
        self.db.close()


class ChatStore:
    """The chat database. One instance per thread (sqlite3 connections are thread-bound).

    Every SQLite failure (a full disk, a second app holding the lock, a damaged
    file) arrives as ChatStoreUnavailable with plain words; a failed write
    changes nothing, so what was saved before stays saved.
    """

    def __init__(
        self, path: Path, clock: Callable[[], float] = time.time, busy_timeout_s: float = 5.0
    ) -> None:
        self.path = path
        self._clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # busy_timeout_s: how long a write waits for another connection's lock.
            raw = sqlite3.connect(str(path), isolation_level=None, timeout=busy_timeout_s)
        except sqlite3.DatabaseError as exc:
            raise _unavailable(exc, path) from exc
        raw.row_factory = sqlite3.Row
        self._db = _Connection(raw, path)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._create_or_migrate()
            self._db.execute("PRAGMA foreign_keys=ON")
            row = self._db.execute("PRAGMA quick_check").fetchone()
            if row is None or row[0] != "ok":
                raise ChatStoreUnavailable(
                    f"the chat database file is damaged ({path}): {row[0] if row else '?'}",
                    "SQLITE_CORRUPT",
                )
            # A message still "streaming" at open was cut off by a crash: keep its
            # text, say what happened.
            self._db.execute("UPDATE messages SET status='interrupted' WHERE status='streaming'")
        except BaseException:
            raw.close()
            raise

    def _create_or_migrate(self) -> None:
        """Creates the tables in a new file or brings an older file to SCHEMA_VERSION."""
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise ChatStoreUnavailable(
                f"the chat database ({self.path}) was written by a newer Peregrine "
                f"(schema {version}; this one reads up to {SCHEMA_VERSION}); update Peregrine "
                "to open it",
                "NEWER_SCHEMA",
            )
        if version == SCHEMA_VERSION:
            return
        tables = {
            row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        # executescript commits first; BEGIN inside the script keeps it one transaction.
        if "chats" not in tables:
            script = _SCHEMA
        else:
            # AUTOINCREMENT's high-water mark: ids of deleted messages stay unused.
            row = self._db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name='messages'"
            ).fetchone()
            seq = int(row[0]) if row else 0
            script = (
                _MIGRATE_0_TO_1
                + f"UPDATE sqlite_sequence SET seq=max(seq, {seq}) WHERE name='messages';\n"
            )
        self._db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version={SCHEMA_VERSION};\nCOMMIT;")

    @classmethod
    def open_or_recover(
        cls, path: Path, clock: Callable[[], float] = time.time, busy_timeout_s: float = 5.0
    ) -> tuple[ChatStore, str | None]:
        """Opens the store; a damaged file is moved aside (kept, never deleted) for a new one.

        Returns the store and, after a recovery, a message for the user. Other
        failures (locked, read-only, full disk) are raised: moving a healthy
        file aside would hide the user's chats.
        """
        try:
            return cls(path, clock, busy_timeout_s), None
        except ChatStoreUnavailable as exc:
            if exc.errorname not in _DAMAGED:
                raise
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(clock()))
            kept = path.with_name(f"{path.name}.damaged-{stamp}")
            for suffix in ("", "-wal", "-shm"):
                part = path.with_name(path.name + suffix)
                if part.exists():
                    part.replace(kept.with_name(kept.name + suffix))
            store = cls(path, clock, busy_timeout_s)
            return store, (
                f"The chat database was damaged, so a new one was started. The old file is "
                f"kept at {kept} ({exc})."
            )

    def close(self) -> None:
        self._db.close()

    # chats ------------------------------------------------------------------

    def create_chat(
        self, title: str = "New chat", system_prompt: str = "", preset: str = "Balanced"
    ) -> Chat:
        title = _clean_title(title)
        now = self._clock()
        cur = self._db.execute(
            "INSERT INTO chats(title, system_prompt, preset, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (title, system_prompt, preset, now, now),
        )
        return self.chat(_rowid(cur))

    def chat(self, chat_id: int) -> Chat:
        row = self._db.execute("SELECT * FROM chats WHERE id=?", (chat_id,)).fetchone()
        if row is None:
            raise ChatStoreError(f"chat {chat_id} does not exist")
        return _chat(row)

    def list_chats(self, search: str = "") -> list[Chat]:
        """Chats, most recently active first; `search` matches titles and message text."""
        if search.strip():
            pattern = "%" + _escape_like(search.strip()) + "%"
            rows = self._db.execute(
                "SELECT * FROM chats WHERE title LIKE ?1 ESCAPE '\\' OR id IN"
                " (SELECT chat_id FROM messages WHERE content LIKE ?1 ESCAPE '\\')"
                " ORDER BY updated_at DESC, id DESC",
                (pattern,),
            ).fetchall()
        else:
            rows = self._db.execute(
                "SELECT * FROM chats ORDER BY updated_at DESC, id DESC"
            ).fetchall()
        return [_chat(r) for r in rows]

    def rename_chat(self, chat_id: int, title: str) -> Chat:
        self._update_chat(chat_id, "title", _clean_title(title))
        return self.chat(chat_id)

    def set_system_prompt(self, chat_id: int, system_prompt: str) -> Chat:
        self._update_chat(chat_id, "system_prompt", system_prompt)
        return self.chat(chat_id)

    def set_preset(self, chat_id: int, preset: str) -> Chat:
        self._update_chat(chat_id, "preset", preset)
        return self.chat(chat_id)

    def set_tools(self, chat_id: int, tools: str, enabled: bool, tool_choice: ToolChoice) -> Chat:
        """Saves a chat's tools (validated by the caller: see app.services.chat.tools)."""
        cur = self._db.execute(
            "UPDATE chats SET tools=?, tools_enabled=?, tool_choice=?, updated_at=? WHERE id=?",
            (tools, int(enabled), tool_choice, self._clock(), chat_id),
        )
        if cur.rowcount == 0:
            raise ChatStoreError(f"chat {chat_id} does not exist")
        return self.chat(chat_id)

    def delete_chat(self, chat_id: int) -> None:
        cur = self._db.execute("DELETE FROM chats WHERE id=?", (chat_id,))
        if cur.rowcount == 0:
            raise ChatStoreError(f"chat {chat_id} does not exist")

    def _update_chat(self, chat_id: int, column: str, value: str) -> None:
        cur = self._db.execute(
            f"UPDATE chats SET {column}=?, updated_at=? WHERE id=?",  # column is ours, not input
            (value, self._clock(), chat_id),
        )
        if cur.rowcount == 0:
            raise ChatStoreError(f"chat {chat_id} does not exist")

    # messages ---------------------------------------------------------------

    def add_message(
        self,
        chat_id: int,
        role: Role,
        content: str,
        status: Status = "complete",
        tool_call_id: str = "",
    ) -> Message:
        """Adds a message; a tool message names the call it answers in tool_call_id."""
        self.chat(chat_id)  # a clear error instead of a foreign-key failure
        if (role == "tool") != bool(tool_call_id):
            raise ChatStoreError("a tool message, and only a tool message, has a tool_call_id")
        now = self._clock()
        with self._db:
            self._db.execute("BEGIN")
            cur = self._db.execute(
                "INSERT INTO messages(chat_id, role, content, status, created_at, tool_call_id)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (chat_id, role, content, status, now, tool_call_id),
            )
            self._db.execute("UPDATE chats SET updated_at=? WHERE id=?", (now, chat_id))
        return self.message(_rowid(cur))

    def message(self, message_id: int) -> Message:
        row = self._db.execute("SELECT * FROM messages WHERE id=?", (message_id,)).fetchone()
        if row is None:
            raise ChatStoreError(f"message {message_id} does not exist")
        return _message(row)

    def messages(self, chat_id: int) -> list[Message]:
        rows = self._db.execute(
            "SELECT * FROM messages WHERE chat_id=? ORDER BY id", (chat_id,)
        ).fetchall()
        return [_message(r) for r in rows]

    def append_delta(self, message_id: int, delta: str) -> None:
        """Appends streamed text to a message and commits (see the module docstring)."""
        cur = self._db.execute(
            "UPDATE messages SET content = content || ? WHERE id=?", (delta, message_id)
        )
        if cur.rowcount == 0:
            raise ChatStoreError(f"message {message_id} does not exist")

    def finish_message(
        self,
        message_id: int,
        status: Status,
        meta: dict[str, Any] | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> Message:
        """Ends a streamed message: its status, figures and the tool calls it made."""
        cur = self._db.execute(
            "UPDATE messages SET status=?, meta=?, tool_calls=? WHERE id=?",
            (status, json.dumps(meta or {}), json.dumps(tool_calls or []), message_id),
        )
        if cur.rowcount == 0:
            raise ChatStoreError(f"message {message_id} does not exist")
        return self.message(message_id)

    def edit_message(self, message_id: int, content: str) -> Message:
        cur = self._db.execute("UPDATE messages SET content=? WHERE id=?", (content, message_id))
        if cur.rowcount == 0:
            raise ChatStoreError(f"message {message_id} does not exist")
        return self.message(message_id)

    def delete_messages_after(self, message_id: int) -> int:
        """Deletes the later messages of the same chat (for regenerate and edit-and-resend)."""
        msg = self.message(message_id)
        cur = self._db.execute(
            "DELETE FROM messages WHERE chat_id=? AND id>?", (msg.chat_id, message_id)
        )
        return cur.rowcount

    def delete_message(self, message_id: int) -> None:
        cur = self._db.execute("DELETE FROM messages WHERE id=?", (message_id,))
        if cur.rowcount == 0:
            raise ChatStoreError(f"message {message_id} does not exist")

    def journal_mode(self) -> str:
        return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])


def _message(row: sqlite3.Row) -> Message:
    data = dict(row)
    data["meta"] = json.loads(data["meta"] or "{}")
    data["tool_calls"] = json.loads(data["tool_calls"] or "[]")
    return Message(**data)


def _chat(row: sqlite3.Row) -> Chat:
    data = dict(row)
    data["tools_enabled"] = bool(data["tools_enabled"])
    return Chat(**data)


def _rowid(cur: sqlite3.Cursor) -> int:
    if cur.lastrowid is None:
        raise ChatStoreError("the database did not return a row id")
    return cur.lastrowid


def _clean_title(title: str) -> str:
    title = " ".join(title.split())
    if not title:
        raise ChatStoreError("a chat title cannot be empty")
    return title[:200]


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
