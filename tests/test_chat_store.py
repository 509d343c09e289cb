"""The chat store: real SQLite files, WAL, and answers saved token by token."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from app.services.chat_service import ChatService, ChatServiceError
from app.services.chat_store import ChatStore, ChatStoreError
from app.services.engine_client import Finished
from engine.paths import Paths


@pytest.fixture
def store() -> ChatStore:
    s = ChatStore(Paths.from_env().chats_db)
    yield s
    s.close()


def test_database_lives_under_the_data_folder_in_wal_mode(store: ChatStore) -> None:
    assert store.path == Paths.from_env().chats_db
    assert store.path.is_file()
    assert store.journal_mode() == "wal"


def test_chats_can_be_created_renamed_searched_and_deleted(store: ChatStore) -> None:
    a = store.create_chat("Rust lifetimes")
    b = store.create_chat("Dinner ideas")
    store.add_message(b.id, "user", "What goes with saffron?")
    assert [c.id for c in store.list_chats()] == [b.id, a.id]
    assert [c.id for c in store.list_chats("rust")] == [a.id]
    assert [c.id for c in store.list_chats("SAFFRON")] == [b.id]  # message text too
    assert store.list_chats("100%") == []  # LIKE wildcards are literal
    assert store.rename_chat(a.id, "  Borrow   checker ").title == "Borrow checker"
    store.delete_chat(b.id)
    assert [c.id for c in store.list_chats()] == [a.id]
    assert store.messages(b.id) == []  # its messages went with it
    with pytest.raises(ChatStoreError, match="does not exist"):
        store.chat(b.id)


def test_bad_input_is_refused_clearly_and_changes_nothing(store: ChatStore) -> None:
    chat = store.create_chat("Keep me")
    with pytest.raises(ChatStoreError, match="empty"):
        store.rename_chat(chat.id, "   ")
    assert store.chat(chat.id).title == "Keep me"
    with pytest.raises(ChatStoreError, match="does not exist"):
        store.add_message(9999, "user", "hello")
    with pytest.raises(ChatStoreError, match="does not exist"):
        store.delete_chat(9999)
    with pytest.raises(ChatStoreError, match="does not exist"):
        store.append_delta(9999, "x")


def test_each_delta_is_committed_so_another_connection_sees_it(store: ChatStore) -> None:
    chat = store.create_chat("Streaming")
    msg = store.add_message(chat.id, "assistant", "", status="streaming")
    other = sqlite3.connect(str(store.path))
    for i, piece in enumerate(["Hel", "lo", ", wor", "ld"]):
        store.append_delta(msg.id, piece)
        seen = other.execute("SELECT content FROM messages WHERE id=?", (msg.id,)).fetchone()[0]
        assert seen == "".join(["Hel", "lo", ", wor", "ld"][: i + 1])
    other.close()


def test_a_crash_mid_stream_keeps_the_partial_answer_marked_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    first = ChatStore(path)
    chat = first.create_chat("Crash")
    msg = first.add_message(chat.id, "assistant", "", status="streaming")
    first.append_delta(msg.id, "partial answ")
    # No close(): the process "dies" here; a fresh process opens the same file.
    reopened = ChatStore(path)
    again = reopened.message(msg.id)
    assert again.content == "partial answ"
    assert again.status == "interrupted"
    reopened.close()
    first.close()


def test_service_send_regenerate_edit_and_failures(store: ChatStore) -> None:
    service = ChatService(store, max_tokens=32)
    chat = service.new_chat(preset="Precise")
    store.set_system_prompt(chat.id, "Be terse.")
    with pytest.raises(ChatServiceError, match="type a message"):
        service.send(chat.id, "  \n")
    gen = service.send(chat.id, "Name a colour")
    assert store.chat(chat.id).title == "Name a colour"
    assert gen.messages == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Name a colour"},
    ]
    assert gen.params == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 32}
    with pytest.raises(ChatServiceError, match="still being written"):
        service.send(chat.id, "another")
    service.on_delta(gen.id, "Blue")
    service.on_finished(gen.id, Finished("stop", {"predicted_n": 1}, {}, 12.0))
    answer = store.messages(chat.id)[-1]
    assert (answer.content, answer.status) == ("Blue", "complete")
    assert answer.meta["timings"] == {"predicted_n": 1}

    regen = service.regenerate(chat.id)
    assert [m["content"] for m in regen.messages] == ["Be terse.", "Name a colour"]
    service.on_delta(regen.id, "Gre")
    service.on_failed(regen.id, "engine died")
    partial = store.messages(chat.id)[-1]
    assert (partial.content, partial.status) == ("Gre", "interrupted")
    # A late result of the failed generation is ignored, not appended.
    service.on_delta(regen.id, "en")
    assert store.message(partial.id).content == "Gre"

    user = store.messages(chat.id)[0]
    edited = service.edit_and_resend(user.id, "Name a fruit")
    assert [m["content"] for m in edited.messages] == ["Be terse.", "Name a fruit"]
    assert [m.role for m in store.messages(chat.id)] == ["user", "assistant"]
    service.request_stop()
    service.on_finished(edited.id, Finished("cancelled"))
    assert store.messages(chat.id)[-1].status == "stopped"
    with pytest.raises(ChatServiceError, match="unknown preset"):
        service.set_preset(chat.id, "Wild")
