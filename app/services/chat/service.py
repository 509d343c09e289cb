"""What happens when the user sends, stops, regenerates or edits: Qt-free chat logic.

The service turns intents into stored messages and a request payload. It does
no I/O of its own beyond the store: whoever runs the stream (a worker thread in
the app, a plain loop in tests) feeds the results back through on_delta,
on_finished and on_failed, which save them as they arrive.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.services.chat.store import (
    Chat,
    ChatStore,
    ChatStoreError,
    ChatStoreUnavailable,
    Message,
    Status,
)
from app.services.chat.tools import ToolSettings, check_settings, settings_of
from app.services.engine.client import Finished
from engine.errors import PeregrineError

# Sampling presets a chat can pick; values are OpenAI request fields.
PRESETS: dict[str, dict[str, Any]] = {
    "Precise": {"temperature": 0.2, "top_p": 0.9},
    "Balanced": {"temperature": 0.7, "top_p": 0.95},
    "Creative": {"temperature": 1.0, "top_p": 1.0},
}
DEFAULT_PRESET = "Balanced"
# After a failed save, streamed text is held this long before the store is tried again.
SAVE_RETRY_S = 1.0
DEFAULT_TITLE = "New chat"


class ChatServiceError(PeregrineError):
    """An intent that cannot be carried out now (busy, empty message, nothing to regenerate)."""


@dataclass(frozen=True)
class Generation:
    """One answer being produced: what to send and where the answer is saved."""

    id: int
    chat_id: int
    assistant_message_id: int
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    started_at: float = 0.0


@dataclass
class _Active:
    generation: Generation
    stop_requested: bool = False
    received: int = 0
    # Streamed text the store could not take (a full disk, a lock held by another
    # program): retried with a later delta, at most once a second, so that a
    # store that waits for a lock cannot stall every token.
    unsaved: str = ""
    save_failure_reported: bool = False
    retry_at: float = 0.0


@dataclass
class _PendingSave:
    """The end of an answer that could not be saved when it finished."""

    message_id: int
    text: str
    status: Status
    meta: dict[str, Any]
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ChatService:
    """Chat intents over a ChatStore; one generation at a time."""

    store: ChatStore
    max_tokens: int = 1024
    clock: Callable[[], float] = time.monotonic
    default_system_prompt: str = ""
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _active: _Active | None = None
    _pending: list[_PendingSave] = field(default_factory=list)

    # chats ------------------------------------------------------------------

    def new_chat(self, preset: str = DEFAULT_PRESET) -> Chat:
        return self.store.create_chat(
            DEFAULT_TITLE, system_prompt=self.default_system_prompt, preset=_preset(preset)
        )

    def set_preset(self, chat_id: int, preset: str) -> Chat:
        return self.store.set_preset(chat_id, _preset(preset))

    def tools(self, chat_id: int) -> ToolSettings:
        """The chat's tools as they are sent."""
        chat = self.store.chat(chat_id)
        return settings_of(chat.tools, chat.tools_enabled, chat.tool_choice)

    def set_tools(self, chat_id: int, text: str, enabled: bool, choice: str) -> Chat:
        """Checks and saves a chat's tools; raises ToolSpecError (nothing saved) when wrong."""
        checked = check_settings(text, enabled, choice)
        return self.store.set_tools(chat_id, text, checked.enabled, checked.choice)

    @property
    def active(self) -> Generation | None:
        return self._active.generation if self._active else None

    # intents ----------------------------------------------------------------

    def send(self, chat_id: int, text: str) -> Generation:
        """Saves the user's message and prepares the answer."""
        if not text.strip():
            raise ChatServiceError("type a message first")
        self._check_idle()
        self.flush_pending()
        chat = self.store.chat(chat_id)
        if chat.title == DEFAULT_TITLE and not self.store.messages(chat_id):
            self.store.rename_chat(chat_id, _title_from(text))
        self.store.add_message(chat_id, "user", text)
        return self._start(chat_id)

    def regenerate(self, chat_id: int) -> Generation:
        """Replaces the last answer with a new one.

        The last answer goes with whatever came after it (results of its tool
        calls); the answer to a tool result is regenerated from that result, so
        the call and the result stay.
        """
        self._check_idle()
        self.flush_pending()
        messages = self.store.messages(chat_id)
        if _last(messages, "user") is None:
            raise ChatServiceError("there is no question to answer again")
        answer = _last(messages, "assistant")
        if answer is not None:
            self.store.delete_messages_after(answer.id)
            self.store.delete_message(answer.id)
        else:
            prompt = _last(messages, "user", "tool")
            assert prompt is not None
            self.store.delete_messages_after(prompt.id)
        return self._start(chat_id)

    def send_tool_result(self, message_id: int, call_id: str, text: str) -> Generation | None:
        """Saves what a tool returned for one call of an answer, as a `tool` message.

        Once every call of that answer has its result, the answer continues (the
        returned Generation); before that it returns None and waits for the rest.
        """
        if not text.strip():
            raise ChatServiceError("type the tool's result first")
        self._check_idle()
        self.flush_pending()
        message = self.store.message(message_id)
        call_ids = [str(c.get("id", "")) for c in message.tool_calls]
        if message.role != "assistant" or call_id not in call_ids:
            raise ChatServiceError("that tool call is not in this chat any more")
        later = [m for m in self.store.messages(message.chat_id) if m.id > message_id]
        if any(m.role != "tool" for m in later):
            raise ChatServiceError(
                "the chat has gone on since this call; only the latest calls take results"
            )
        answered = {m.tool_call_id for m in later}
        if call_id in answered:
            raise ChatServiceError("this call already has its result")
        self.store.add_message(message.chat_id, "tool", text, tool_call_id=call_id)
        if set(call_ids) - answered - {call_id}:
            return None
        return self._start(message.chat_id)

    def edit_and_resend(self, message_id: int, text: str) -> Generation:
        """Changes a user message, drops everything after it and answers again."""
        if not text.strip():
            raise ChatServiceError("an edited message cannot be empty")
        self._check_idle()
        self.flush_pending()
        message = self.store.message(message_id)
        if message.role != "user":
            raise ChatServiceError("only your own messages can be edited and resent")
        self.store.edit_message(message_id, text)
        self.store.delete_messages_after(message_id)
        return self._start(message.chat_id)

    def request_stop(self) -> bool:
        """Marks the active generation as stopped by the user; False when idle."""
        if self._active is None:
            return False
        self._active.stop_requested = True
        return True

    # results ----------------------------------------------------------------

    def on_delta(self, generation_id: int, text: str) -> None:
        """Saves streamed text as it arrives.

        When the store fails (a full disk), the text is kept here and saved
        with the next delta that gets through; the first failure of an answer
        is raised (ChatStoreUnavailable) so that the app can say so once.
        """
        active = self._current(generation_id)
        if active is None:
            return
        active.received += 1
        pending = active.unsaved + text
        if active.unsaved and self.clock() < active.retry_at:
            active.unsaved = pending
            return
        try:
            self.store.append_delta(active.generation.assistant_message_id, pending)
        except ChatStoreUnavailable:
            active.unsaved = pending
            active.retry_at = self.clock() + SAVE_RETRY_S
            if active.save_failure_reported:
                return
            active.save_failure_reported = True
            raise
        active.unsaved = ""

    def on_finished(self, generation_id: int, result: Finished) -> Message | None:
        """Saves the end of an answer; raises ChatStoreUnavailable if it could not.

        Text that could not be saved is kept and saved before the next intent
        (see flush_pending).
        """
        active = self._current(generation_id)
        if active is None:
            return None
        stopped = result.finish_reason == "cancelled" or active.stop_requested
        # A stopped answer's calls may be cut short: only a finished answer's calls count.
        calls = [] if stopped else list(result.tool_calls)
        meta: dict[str, Any] = {
            "finish_reason": result.finish_reason,
            "timings": result.timings,
            "usage": result.usage,
            "ttft_ms": result.ttft_ms,
            "model": result.model,
        }
        self._active = None
        return self._finish(active, "stopped" if stopped else "complete", meta, calls)

    def on_failed(self, generation_id: int, error: str) -> Message | None:
        """Keeps whatever text arrived (status interrupted) and records the error."""
        active = self._current(generation_id)
        if active is None:
            return None
        self._active = None
        has_text = active.received > 0 and bool(
            active.unsaved or self._saved_text(active.generation.assistant_message_id)
        )
        return self._finish(active, "interrupted" if has_text else "error", {"error": error})

    def flush_pending(self) -> None:
        """Saves answers' ends that a full disk held back; raises while it still cannot."""
        while self._pending:
            save = self._pending[0]
            try:
                if save.text:
                    self.store.append_delta(save.message_id, save.text)
                    save.text = ""
                self.store.finish_message(save.message_id, save.status, save.meta, save.tool_calls)
            except ChatStoreUnavailable:
                raise
            except ChatStoreError:
                pass  # the message is gone (its chat was deleted): nothing left to save
            self._pending.pop(0)

    def forget_chat(self, chat_id: int) -> None:
        """Drops what is in flight for a chat that is being deleted."""
        if self._active is not None and self._active.generation.chat_id == chat_id:
            self._active = None

    @property
    def has_unsaved(self) -> bool:
        return bool(self._pending) or bool(self._active and self._active.unsaved)

    def _finish(
        self,
        active: _Active,
        status: Status,
        meta: dict[str, Any],
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> Message:
        save = _PendingSave(
            active.generation.assistant_message_id, active.unsaved, status, meta, tool_calls or []
        )
        self._pending.append(save)
        self.flush_pending()
        return self.store.message(save.message_id)

    def _saved_text(self, message_id: int) -> str:
        try:
            return self.store.message(message_id).content
        except ChatStoreUnavailable:
            return ""

    # helpers ----------------------------------------------------------------

    def payload(self, chat_id: int) -> list[dict[str, Any]]:
        """The conversation as OpenAI messages, for the next answer.

        An assistant's tool calls go back as `tool_calls` (content null when it
        wrote nothing else), each result as a `tool` message with its call's id.
        Calls the user went past without a result are left out: OpenAI-compatible
        servers refuse a call that no tool message answers.
        """
        chat = self.store.chat(chat_id)
        out: list[dict[str, Any]] = []
        if chat.system_prompt.strip():
            out.append({"role": "system", "content": chat.system_prompt})
        messages = [
            m for m in self.store.messages(chat_id) if m.status not in ("error", "streaming")
        ]
        answered = {m.tool_call_id for m in messages if m.role == "tool"}
        for m in messages:
            if m.role == "assistant" and m.tool_calls:
                calls = [c for c in m.tool_calls if c.get("id") in answered]
                if calls:
                    out.append(
                        {"role": "assistant", "content": m.content or None, "tool_calls": calls}
                    )
                    continue
            if m.role == "tool":
                out.append({"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content})
                continue
            if not m.content:
                continue
            out.append({"role": m.role, "content": m.content})
        return out

    def _start(self, chat_id: int) -> Generation:
        chat = self.store.chat(chat_id)
        messages = self.payload(chat_id)
        assistant = self.store.add_message(chat_id, "assistant", "", status="streaming")
        after_result = bool(messages) and messages[-1]["role"] == "tool"
        params = {
            **PRESETS.get(chat.preset, PRESETS[DEFAULT_PRESET]),
            "max_tokens": self.max_tokens,
            **self.tools(chat_id).request_fields(after_tool_result=after_result),
        }
        generation = Generation(
            id=next(self._ids),
            chat_id=chat_id,
            assistant_message_id=assistant.id,
            messages=messages,
            params=params,
            started_at=self.clock(),
        )
        self._active = _Active(generation)
        return generation

    def _check_idle(self) -> None:
        if self._active is not None:
            raise ChatServiceError("an answer is still being written; stop it first")

    def _current(self, generation_id: int) -> _Active | None:
        # Results of an old generation (already failed or finished) are ignored.
        if self._active is None or self._active.generation.id != generation_id:
            return None
        return self._active


def _preset(name: str) -> str:
    if name not in PRESETS:
        raise ChatServiceError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return name


def _last(messages: list[Message], *roles: str) -> Message | None:
    for m in reversed(messages):
        if m.role in roles:
            return m
    return None


def _title_from(text: str) -> str:
    words = " ".join(text.split())
    return words if len(words) <= 48 else words[:47].rstrip() + "…"
