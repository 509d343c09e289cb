"""The chat store: real SQLite files, WAL, and answers saved token by token."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from app.services.chat.service import ChatService, ChatServiceError
from app.services.chat.store import ChatStore, ChatStoreError, ChatStoreUnavailable
from app.services.engine.client import Finished
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


def _fill_disk(store: ChatStore) -> None:
    """Makes the database full, as a full disk would: SQLite answers SQLITE_FULL.

    (max_page_count is SQLite's own cap; a real full file system gives the same error.)
    """
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count={pages}")


def _free_disk(store: ChatStore) -> None:
    store._db.execute("PRAGMA max_page_count=1073741823")


def test_a_full_disk_is_a_clear_error_and_keeps_what_was_saved(store: ChatStore) -> None:
    chat = store.create_chat("Falcons")
    answer = store.add_message(chat.id, "assistant", "", status="streaming")
    store.append_delta(answer.id, "kept so far. ")
    _fill_disk(store)
    with pytest.raises(ChatStoreUnavailable, match="the disk is full") as exc:
        store.append_delta(answer.id, "x" * 200_000)
    assert str(store.path) in str(exc.value)
    with pytest.raises(ChatStoreUnavailable, match="the disk is full"):
        store.add_message(chat.id, "user", "z" * 200_000)
    assert len(store.messages(chat.id)) == 1  # the failed insert left nothing behind
    assert store.message(answer.id).content == "kept so far. "
    _free_disk(store)
    store.append_delta(answer.id, "more")
    assert store.message(answer.id).content == "kept so far. more"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_service_keeps_streamed_text_through_a_full_disk(store: ChatStore) -> None:
    clock = FakeClock()
    service = ChatService(store, clock=clock)
    chat = service.new_chat()
    gen = service.send(chat.id, "Tell me about falcons.")
    service.on_delta(gen.id, "Fal")
    _fill_disk(store)
    big = "c" * 100_000  # bigger than any page slack, so it cannot fit
    with pytest.raises(ChatStoreUnavailable):
        service.on_delta(gen.id, big)  # the first failure is reported...
    clock.now += 1.5
    service.on_delta(gen.id, "d" * 100_000)  # ...once per answer
    assert service.has_unsaved
    _free_disk(store)
    service.on_delta(gen.id, "e")  # held: the store is retried once a second, not per token
    assert store.message(gen.assistant_message_id).content == "Fal"
    clock.now += 1.5
    service.on_delta(gen.id, "")  # the held-back text goes with the next delta after that
    answer_id = gen.assistant_message_id
    assert store.message(answer_id).content == "Fal" + big + "d" * 100_000 + "e"
    assert not service.has_unsaved
    # The end of the answer cannot be saved either: kept, and saved before the next intent.
    _fill_disk(store)
    tail = " tail" + "f" * 100_000
    service.on_delta(gen.id, tail)  # held back (already reported for this answer)
    clock.now += 1.5
    finished = Finished("stop", {"prompt_n": 5}, {"completion_tokens": 9}, 12.0, "m")
    with pytest.raises(ChatStoreUnavailable):
        service.on_finished(gen.id, finished)
    assert service.has_unsaved and service.active is None
    with pytest.raises(ChatStoreUnavailable):
        service.send(chat.id, "Next question")  # refused while the answer is unsaved
    _free_disk(store)
    service.send(chat.id, "Next question")
    saved = store.messages(chat.id)
    assert [m.role for m in saved] == ["user", "assistant", "user", "assistant"]
    assert saved[1].status == "complete"
    assert saved[1].content == "Fal" + big + "d" * 100_000 + "e" + tail
    assert saved[1].meta["usage"] == {"completion_tokens": 9}


def test_a_lock_held_by_another_program_costs_one_short_wait_a_second(tmp_path: Path) -> None:
    path = tmp_path / "chats.db"
    store = ChatStore(path, busy_timeout_s=0.05)
    clock = FakeClock()
    service = ChatService(store, clock=clock)
    chat = service.new_chat()
    gen = service.send(chat.id, "Tell me about falcons.")
    tries = 0
    real_append = store.append_delta

    def counting(message_id: int, delta: str) -> None:
        nonlocal tries
        tries += 1
        real_append(message_id, delta)

    store.append_delta = counting  # type: ignore[method-assign]
    other = sqlite3.connect(str(path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. a database browser with unsaved edits
    with pytest.raises(ChatStoreUnavailable, match="another program"):
        service.on_delta(gen.id, "a")
    for _ in range(100):  # tokens within the same second: held, the store is not tried
        service.on_delta(gen.id, "b")
    assert tries == 1
    other.execute("ROLLBACK")
    other.close()
    clock.now += 1.5
    service.on_delta(gen.id, "c")
    assert tries == 2
    assert store.message(gen.assistant_message_id).content == "a" + "b" * 100 + "c"
    store.close()


def test_a_damaged_database_is_moved_aside_and_a_new_one_started(tmp_path: Path) -> None:
    path = tmp_path / "chats.db"
    path.write_bytes(b"this is not a database\n" * 500)
    store, notice = ChatStore.open_or_recover(path)
    try:
        assert notice is not None and "damaged" in notice
        kept = list(tmp_path.glob("chats.db.damaged-*"))
        assert len(kept) == 1 and kept[0].read_bytes() == b"this is not a database\n" * 500
        assert str(kept[0]) in notice
        chat = store.create_chat("Fresh start")
        assert [c.id for c in store.list_chats()] == [chat.id]
    finally:
        store.close()


def test_a_truncated_database_is_detected_at_open(tmp_path: Path) -> None:
    path = tmp_path / "chats.db"
    store = ChatStore(path)
    chat = store.create_chat("Long chat")
    for i in range(300):
        store.add_message(chat.id, "user", f"message {i} " + "words " * 100)
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ChatStoreUnavailable, match="damaged"):
        ChatStore(path)
    recovered, notice = ChatStore.open_or_recover(path)
    recovered.close()
    assert notice is not None
    assert len(list(tmp_path.glob("chats.db.damaged-*"))) == 1


def test_a_locked_database_is_a_clear_error_and_never_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "chats.db"
    ChatStore(path).close()
    other = sqlite3.connect(str(path), isolation_level=None)
    other.execute("PRAGMA locking_mode=EXCLUSIVE")
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(ChatStoreUnavailable, match="another program"):
            ChatStore.open_or_recover(path, busy_timeout_s=0.1)
        assert not list(tmp_path.glob("chats.db.damaged-*"))
    finally:
        other.execute("ROLLBACK")
        other.close()
    store, notice = ChatStore.open_or_recover(path)
    store.close()
    assert notice is None
