"""The conversation: message bubbles rendered from Markdown, and the composer.

Widgets only draw what they are given and emit what the user asked for; the
main window decides what happens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from PySide6.QtCore import QEvent, QObject, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QGuiApplication, QKeyEvent, QResizeEvent
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QTextBrowser,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app.qt import theme
from app.qt.markdown_render import MarkdownRenderer, Rendered
from app.services.chat.store import Message
from app.services.chat.tools import pretty, summary

STATUS_TAGS = {
    "stopped": "stopped",
    "interrupted": "interrupted: the engine stopped",
    "error": "failed",
    "streaming": "writing…",
}


class MarkdownView(QTextBrowser):
    """A QTextBrowser that is exactly as tall as its content."""

    copy_code = Signal(int)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setOpenLinks(False)
        self.setOpenExternalLinks(False)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.document().setDocumentMargin(2)
        self.anchorClicked.connect(self._on_anchor)
        self.document().documentLayout().documentSizeChanged.connect(self._fit)

    def _on_anchor(self, url: QUrl) -> None:
        if url.scheme() == "copy":
            self.copy_code.emit(int(url.path() or 0))
        elif url.scheme() in ("http", "https", "mailto"):
            # Web links open in the user's browser, on a click only.
            QDesktopServices.openUrl(url)

    def loadResource(self, kind: int, name: QUrl | str) -> Any:
        """Nothing is ever loaded: message text is untrusted (see MarkdownRenderer._image)."""
        return None

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        # Height changes are our own (_fit); only a new width needs a new layout.
        if event.size().width() != event.oldSize().width():
            self._fit()

    def _fit(self) -> None:
        width = self.viewport().width()
        if self.document().textWidth() != width:
            self.document().setTextWidth(width)  # a full relayout: only when it changed
        height = int(self.document().size().height()) + 4
        if height != self.height():
            self.setFixedHeight(height)


# A tool block's details grow with their text up to this height, then scroll.
DETAILS_MAX_HEIGHT = 240


@dataclass
class ToolState:
    """What the view knows about a chat's tool calls, shared by its message widgets.

    names: call id -> tool name; answered: calls that have a result; open: calls
    that can take a result now (the latest answer's, while nothing came after
    them but results); drafts: results being typed, kept across redraws;
    expanded: blocks the user opened ("call:ID", "result:MESSAGE_ID").
    """

    names: dict[str, str] = field(default_factory=dict)
    answered: set[str] = field(default_factory=set)
    open: set[str] = field(default_factory=set)
    drafts: dict[str, str] = field(default_factory=dict)
    expanded: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, messages: list[Message], keep: ToolState | None = None) -> ToolState:
        names: dict[str, str] = {}
        for m in messages:
            for call in m.tool_calls:
                names[str(call.get("id", ""))] = str(call.get("function", {}).get("name", ""))
        answered = {m.tool_call_id for m in messages if m.role == "tool"}
        open_calls: set[str] = set()
        for m in reversed(messages):
            if m.role == "tool":
                continue
            if m.role == "assistant" and m.status == "complete":
                open_calls = {str(c.get("id", "")) for c in m.tool_calls} - answered
            break
        state = cls(names, answered, open_calls)
        if keep is not None:
            state.drafts, state.expanded = keep.drafts, keep.expanded
        return state

    def shape(self, message: Message) -> tuple[Any, ...]:
        """What a message's widget shows of this state: it is rebuilt when this changes."""
        if message.role == "tool":
            return (self.names.get(message.tool_call_id, ""),)
        ids = [str(c.get("id", "")) for c in message.tool_calls]
        return (
            json.dumps(message.tool_calls),
            tuple(i in self.answered for i in ids),
            tuple(i in self.open for i in ids),
        )


class DetailsView(QPlainTextEdit):
    """Read-only monospace text that is as tall as its lines, up to DETAILS_MAX_HEIGHT."""

    def __init__(self, text: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("toolDetails")
        self.setReadOnly(True)
        self.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.setPlainText(text)
        self._lines = max(1, text.count("\n") + 1)
        self._fit()

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() in (QEvent.Type.FontChange, QEvent.Type.StyleChange):
            self._fit()  # the style sheet's monospace font arrives after construction

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        if event.size().width() != event.oldSize().width():
            self._fit()  # a horizontal scroll bar comes and goes with the width

    def _fit(self) -> None:
        margins = self.contentsMargins()
        frame = margins.top() + margins.bottom()
        document = 2 * self.document().documentMargin()
        bar = self.horizontalScrollBar().sizeHint().height()
        wide = self.document().idealWidth() > self.viewport().width() > 0
        # Half a line to spare: QPlainTextEdit scrolls by lines and wants a part-line more.
        spacing = self.fontMetrics().lineSpacing()
        height = self._lines * spacing + spacing // 2 + frame + int(document)
        self.setFixedHeight(min(DETAILS_MAX_HEIGHT, height + (bar if wide else 0)))


class BlockHeader(QPushButton):
    """A block's header button whose one line ends in "…" when the block is narrow.

    A push button, not a tool button: only push buttons align their text left in
    a style sheet.
    """

    def __init__(self) -> None:
        super().__init__()
        self._full = ""
        # Ignored: the text never widens the chat; it is elided to fit instead.
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.setMinimumWidth(80)

    def set_full_text(self, text: str) -> None:
        self._full = text
        self.setToolTip(text + "\n(Space shows or hides the details)")
        self._elide()

    def full_text(self) -> str:
        return self._full

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        self._elide()

    def _elide(self) -> None:
        room = max(20, self.width() - 20)  # the button's padding
        self.setText(self.fontMetrics().elidedText(self._full, Qt.TextElideMode.ElideRight, room))


class ToolBlock(QFrame):
    """A collapsible block: a one-line header that opens to show details.

    The header is a button: Tab reaches it, Space or Enter opens and closes it.
    """

    toggled = Signal(bool)

    def __init__(
        self, title: str, brief: str, details: str, expanded: bool, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.setObjectName("toolBlock")
        self._lay = lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 4, 8, 6)
        lay.setSpacing(4)
        row = QHBoxLayout()
        row.setSpacing(6)
        self._title = title
        self._brief = brief
        self.header = BlockHeader()
        self.header.setObjectName("toolHeader")
        self.header.setCheckable(True)
        self.header.setCursor(Qt.CursorShape.PointingHandCursor)
        self.header.toggled.connect(self._on_toggled)
        row.addWidget(self.header, 1)
        self.state = QLabel()
        self.state.setObjectName("tag")
        row.addWidget(self.state)
        lay.addLayout(row)
        self.details = DetailsView(details)
        self.details.setAccessibleName(f"{title} details")
        lay.addWidget(self.details)
        self.header.setChecked(expanded)
        self._on_toggled(expanded)

    @property
    def expanded(self) -> bool:
        return self.header.isChecked()

    def _on_toggled(self, expanded: bool) -> None:
        mark = "▾" if expanded else "▸"
        brief = f"   {self._brief}" if self._brief else ""
        self.header.set_full_text(f"{mark}  {self._title}{brief}")
        self.details.setVisible(expanded)
        self.toggled.emit(expanded)


class ToolCallBlock(ToolBlock):
    """One tool call: name and arguments; while it waits, a box for the tool's result."""

    result_submitted = Signal(str, str)  # call id, result text
    draft_changed = Signal(str, str)  # call id, text typed so far

    def __init__(
        self,
        call: dict[str, Any],
        state: ToolState,
        parent: QWidget | None = None,
    ) -> None:
        self.call_id = str(call.get("id", ""))
        function = call.get("function", {})
        self.name = str(function.get("name", "")) or "tool"
        arguments = str(function.get("arguments", ""))
        super().__init__(
            f"Call {self.name}",
            summary(arguments),
            pretty(arguments),
            f"call:{self.call_id}" in state.expanded,
            parent,
        )
        self.setObjectName("toolBlock")
        self.header.setAccessibleName(f"Tool call {self.name}")
        self.result_input: QPlainTextEdit | None = None
        self.send_button: QPushButton | None = None
        if self.call_id in state.open:
            self.state.setText("waiting for its result")
            self.state.setObjectName("toolWaiting")
            row = QHBoxLayout()
            row.setSpacing(6)
            self.result_input = QPlainTextEdit(state.drafts.get(self.call_id, ""))
            self.result_input.setObjectName("toolResultInput")
            self.result_input.setPlaceholderText(
                f"Peregrine runs no tools: type what {self.name} returned (text or JSON), "
                "then Ctrl+Enter"
            )
            self.result_input.setAccessibleName(f"Result of {self.name}")
            self.result_input.setTabChangesFocus(True)
            self.result_input.setFixedHeight(58)
            self.result_input.installEventFilter(self)
            self.result_input.textChanged.connect(
                lambda: self.draft_changed.emit(self.call_id, self._draft())
            )
            self.send_button = QPushButton("Send result")
            self.send_button.setObjectName("primary")
            self.send_button.setToolTip("Adds the result to the chat and continues the answer")
            self.send_button.clicked.connect(self._submit)
            row.addWidget(self.result_input, 1)
            row.addWidget(self.send_button, 0, Qt.AlignmentFlag.AlignBottom)
            self._lay.addLayout(row)
        elif self.call_id in state.answered:
            self.state.setText("answered below")
        else:
            self.state.setText("no result")
            self.state.setToolTip("The chat went on without this tool's result")

    def _draft(self) -> str:
        return self.result_input.toPlainText() if self.result_input is not None else ""

    def _submit(self) -> None:
        text = self._draft()
        if text.strip():
            self.result_submitted.emit(self.call_id, text)
        elif self.result_input is not None:
            self.result_input.setFocus()

    def set_enabled(self, enabled: bool) -> None:
        if self.send_button is not None:
            self.send_button.setEnabled(enabled)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if watched is self.result_input and event.type() == QEvent.Type.KeyPress:
            assert isinstance(event, QKeyEvent)
            if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and (
                event.modifiers() & Qt.KeyboardModifier.ControlModifier
            ):
                if self.send_button is not None and self.send_button.isEnabled():
                    self._submit()
                return True
        return super().eventFilter(watched, event)


class MessageWidget(QFrame):
    """One message: role header, actions, and the rendered text.

    An assistant's tool calls follow its text as ToolCallBlocks; a tool
    message (a result) is one ToolBlock of its own.
    """

    copy_requested = Signal(int)
    edit_requested = Signal(int)
    regenerate_requested = Signal(int)
    result_submitted = Signal(int, str, str)  # assistant message id, call id, result
    draft_changed = Signal(str, str)  # call id, text
    block_toggled = Signal(str, bool)  # "call:ID" or "result:MESSAGE_ID", expanded

    def __init__(
        self,
        message: Message,
        renderer: MarkdownRenderer,
        last: bool,
        tools: ToolState | None = None,
    ) -> None:
        super().__init__()
        self.message = message
        self._renderer = renderer
        self._rendered = Rendered("")
        tools = tools or ToolState()
        self.shape = tools.shape(message)
        self.call_blocks: list[ToolCallBlock] = []
        self.result_block: ToolBlock | None = None
        self.setObjectName(f"bubble_{message.role}")
        if message.role == "tool":
            self._build_result(message, tools)
            return
        outer = QVBoxLayout(self)
        outer.setContentsMargins(14, 10, 14, 10)
        outer.setSpacing(4)
        head = QHBoxLayout()
        head.setSpacing(6)
        role = QLabel("You" if message.role == "user" else "Assistant")
        role.setObjectName("role")
        self.tag = QLabel()
        self.tag.setObjectName("tag")
        head.addWidget(role)
        head.addWidget(self.tag)
        head.addStretch(1)
        self.copy_button = self._action("Copy", lambda: self.copy_requested.emit(message.id))
        head.addWidget(self.copy_button)
        # Edit and Regenerate start a new answer: greyed out while one streams.
        self.edit_button: QToolButton | None = None
        self.regenerate_button: QToolButton | None = None
        if message.role == "user":
            self.edit_button = self._action("Edit", lambda: self.edit_requested.emit(message.id))
            head.addWidget(self.edit_button)
        elif last:
            self.regenerate_button = self._action(
                "Regenerate", lambda: self.regenerate_requested.emit(message.id)
            )
            head.addWidget(self.regenerate_button)
        outer.addLayout(head)
        self.body = MarkdownView()
        self.body.copy_code.connect(self._copy_code)
        outer.addWidget(self.body)
        for call in message.tool_calls:
            block = ToolCallBlock(call, tools)
            key = f"call:{block.call_id}"
            block.toggled.connect(lambda on, key=key: self.block_toggled.emit(key, on))
            block.result_submitted.connect(
                lambda call_id, text: self.result_submitted.emit(message.id, call_id, text)
            )
            block.draft_changed.connect(self.draft_changed)
            outer.addWidget(block)
            self.call_blocks.append(block)
        self.set_content(message.content, message.status)

    def _build_result(self, message: Message, tools: ToolState) -> None:
        """A tool's result: one collapsible block, indented under the call it answers."""
        self.text: str = message.content
        self.status: str = message.status
        self.edit_button = self.regenerate_button = None
        self.tag = QLabel()
        outer = QVBoxLayout(self)
        outer.setContentsMargins(24, 0, 0, 0)
        name = tools.names.get(message.tool_call_id, "") or "tool"
        key = f"result:{message.id}"
        self.result_block = ToolBlock(
            f"Result of {name}",
            summary(message.content),
            pretty(message.content),
            key in tools.expanded,
        )
        self.result_block.header.setAccessibleName(f"Result of {name}")
        self.result_block.toggled.connect(lambda on: self.block_toggled.emit(key, on))
        outer.addWidget(self.result_block)

    def set_actions_enabled(self, enabled: bool) -> None:
        for button in (self.edit_button, self.regenerate_button):
            if button is not None:
                button.setEnabled(enabled)
        for block in self.call_blocks:
            block.set_enabled(enabled)

    def _action(self, text: str, slot: object) -> QToolButton:
        button = QToolButton()
        button.setText(text)
        button.setCursor(Qt.CursorShape.PointingHandCursor)
        button.clicked.connect(slot)
        return button

    def set_content(self, text: str, status: str) -> None:
        self.text = text
        self.status = status
        self.tag.setText(STATUS_TAGS.get(status, ""))
        if self.result_block is not None:
            return  # a result's text never changes
        muted = self._renderer.palette.muted
        # An answer that is only tool calls has no text to show.
        self.body.setVisible(bool(text) or not self.call_blocks)
        if not text and status == "streaming":
            self.body.setHtml(f"<p style='color:{muted}'>…</p>")
            return
        if not text and status in ("error", "interrupted", "stopped"):
            self.body.setHtml(f"<p style='color:{muted}'><i>No answer was received.</i></p>")
            return
        self._rendered = self._renderer.render(text)
        self.body.setHtml(self._rendered.html)

    def _copy_code(self, index: int) -> None:
        if 0 <= index < len(self._rendered.code_blocks):
            QGuiApplication.clipboard().setText(self._rendered.code_blocks[index])


class ConversationView(QScrollArea):
    """The messages of one chat; follows a stream unless the user scrolled up."""

    copy_requested = Signal(int)
    edit_requested = Signal(int)
    regenerate_requested = Signal(int)
    result_submitted = Signal(int, str, str)  # assistant message id, call id, result

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.tools = ToolState()
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self._renderer = MarkdownRenderer()
        # Warm the highlighter now: its first use imports lexer modules (~100 ms),
        # which would otherwise land in the middle of the first streamed answer.
        self._renderer.render("```python\npass\n```")
        self._inner = QWidget()
        self._inner.setObjectName("conversation")
        self._layout = QVBoxLayout(self._inner)
        self._layout.setContentsMargins(28, 20, 28, 20)
        self._layout.setSpacing(14)
        self._layout.addStretch(1)
        self.setWidget(self._inner)
        self.widgets: dict[int, MessageWidget] = {}
        self._empty = self._empty_state()
        self._layout.insertWidget(0, self._empty)
        self._follow = True
        self._busy = False
        self.verticalScrollBar().valueChanged.connect(self._on_scrolled)
        self.verticalScrollBar().rangeChanged.connect(self._on_range)

    def _empty_state(self) -> QWidget:
        box = QWidget()
        lay = QVBoxLayout(box)
        lay.setContentsMargins(0, 120, 0, 0)
        lay.setSpacing(8)
        title = QLabel("Start a conversation")
        title.setObjectName("emptyTitle")
        title.setAlignment(Qt.AlignmentFlag.AlignCenter)
        hint = QLabel(
            "Type below and press Enter to send · Shift+Enter for a new line\n"
            "Everything runs on this computer; pick a model, a preset or a system prompt above."
        )
        hint.setObjectName("emptyHint")
        hint.setAlignment(Qt.AlignmentFlag.AlignCenter)
        lay.addWidget(title)
        lay.addWidget(hint)
        return box

    @property
    def is_empty(self) -> bool:
        return not self.widgets

    def set_messages(self, messages: list[Message]) -> None:
        """Rebuilds the view for a whole chat (switching chats, after regenerate)."""
        for widget in self.widgets.values():
            self._layout.removeWidget(widget)
            widget.deleteLater()
        self.widgets = {}
        self.tools = ToolState.of(messages, self.tools)
        last_assistant = max((m.id for m in messages if m.role == "assistant"), default=None)
        for m in messages:
            self._add(m, last=m.id == last_assistant)
        self._empty.setVisible(not messages)
        self._follow = True
        QTimer.singleShot(0, self._scroll_to_bottom)

    def sync_messages(self, messages: list[Message]) -> None:
        """Brings the view to `messages` of the chat already shown, redrawing only changes.

        Widgets of removed messages go, new messages get widgets, and a kept
        message is re-rendered only if its text, status or "last answer" role
        changed. Falls back to set_messages when the view shows another chat.
        """
        ids = [m.id for m in messages]
        kept = [i for i in self.widgets if i in ids]
        if not self.widgets or kept != ids[: len(kept)]:
            self.set_messages(messages)
            return
        for message_id in [i for i in self.widgets if i not in ids]:
            gone = self.widgets.pop(message_id)
            self._layout.removeWidget(gone)
            gone.deleteLater()
        last_assistant = max((m.id for m in messages if m.role == "assistant"), default=None)
        self.tools = ToolState.of(messages, self.tools)
        for m in messages:
            last = m.id == last_assistant
            widget = self.widgets.get(m.id)
            if widget is not None and (
                (widget.regenerate_button is not None) != last
                or widget.shape != self.tools.shape(m)
            ):
                # The Regenerate button moves to the newest answer, or its tool calls
                # got their calls or results: rebuild this one.
                index = self._layout.indexOf(widget)
                self._layout.removeWidget(widget)
                widget.deleteLater()
                self._add(m, last, index)
            elif widget is None:
                self._add(m, last)
            elif (widget.text, widget.status) != (m.content, m.status):
                widget.set_content(m.content, m.status)
        self.widgets = {i: self.widgets[i] for i in ids}  # in message order
        self._empty.setVisible(not messages)
        self._follow = True
        QTimer.singleShot(0, self._scroll_to_bottom)

    def _add(self, message: Message, last: bool, index: int | None = None) -> MessageWidget:
        widget = MessageWidget(message, self._renderer, last, self.tools)
        widget.copy_requested.connect(self.copy_requested)
        widget.edit_requested.connect(self.edit_requested)
        widget.regenerate_requested.connect(self.regenerate_requested)
        widget.result_submitted.connect(self.result_submitted)
        widget.draft_changed.connect(self._on_draft)
        widget.block_toggled.connect(self._on_block_toggled)
        if message.role == "user":
            # User bubbles hug the right, as in every chat app.
            widget.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
        self._layout.insertWidget(self._layout.count() - 1 if index is None else index, widget)
        self.widgets[message.id] = widget
        widget.set_actions_enabled(not self._busy)
        return widget

    def set_palette(self, palette: theme.Palette) -> None:
        """Draws messages in another theme from now on (rebuild them with set_messages)."""
        self._renderer = MarkdownRenderer(palette)
        self._renderer.render("```python\npass\n```")

    def set_busy(self, busy: bool) -> None:
        """While an answer streams, Edit and Regenerate are disabled."""
        self._busy = busy
        for widget in self.widgets.values():
            widget.set_actions_enabled(not busy)

    def update_message(self, message_id: int, text: str, status: str) -> None:
        """Re-renders one message only (the one being streamed)."""
        widget = self.widgets.get(message_id)
        if widget is not None:
            widget.set_content(text, status)

    def forget_draft(self, call_id: str) -> None:
        """Drops a result's typed text once it has been sent."""
        self.tools.drafts.pop(call_id, None)

    def _on_draft(self, call_id: str, text: str) -> None:
        if text:
            self.tools.drafts[call_id] = text
        else:
            self.tools.drafts.pop(call_id, None)

    def _on_block_toggled(self, key: str, expanded: bool) -> None:
        if expanded:
            self.tools.expanded.add(key)
        else:
            self.tools.expanded.discard(key)

    def _on_scrolled(self, value: int) -> None:
        bar = self.verticalScrollBar()
        self._follow = value >= bar.maximum() - 24

    def _on_range(self, _minimum: int, maximum: int) -> None:
        if self._follow:
            self.verticalScrollBar().setValue(maximum)

    def _scroll_to_bottom(self) -> None:
        self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())

    @property
    def following(self) -> bool:
        return self._follow


class Composer(QWidget):
    """The message box: Enter sends, Shift+Enter adds a line, Escape cancels an edit."""

    send_requested = Signal(str)
    stop_requested = Signal()
    edit_cancelled = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(28, 8, 28, 14)
        lay.setSpacing(6)
        self.edit_banner = QLabel("Editing a message: Enter resends it, Esc cancels")
        self.edit_banner.setObjectName("hint")
        self.edit_banner.hide()
        lay.addWidget(self.edit_banner)
        row = QHBoxLayout()
        row.setSpacing(8)
        self.input = QPlainTextEdit()
        self.input.setObjectName("composer")
        self.input.setPlaceholderText(
            "Message the model…  (Enter to send, Shift+Enter for a new line)"
        )
        self.input.setFixedHeight(72)
        self.input.installEventFilter(self)
        self.send_button = QPushButton("Send")
        self.send_button.setObjectName("primary")
        self.send_button.setFixedWidth(88)
        self.send_button.clicked.connect(self._on_button)
        row.addWidget(self.input, 1)
        row.addWidget(self.send_button, 0, Qt.AlignmentFlag.AlignBottom)
        lay.addLayout(row)
        self._streaming = False

    def set_streaming(self, streaming: bool) -> None:
        self._streaming = streaming
        self.send_button.setText("Stop" if streaming else "Send")
        self.send_button.setObjectName("danger" if streaming else "primary")
        self.send_button.style().unpolish(self.send_button)
        self.send_button.style().polish(self.send_button)

    def begin_edit(self, text: str) -> None:
        self.edit_banner.show()
        self.input.setPlainText(text)
        self.input.setFocus()

    def end_edit(self) -> None:
        self.edit_banner.hide()

    @property
    def editing(self) -> bool:
        return not self.edit_banner.isHidden()

    def _on_button(self) -> None:
        if self._streaming:
            self.stop_requested.emit()
        else:
            self._submit()

    def _submit(self) -> None:
        text = self.input.toPlainText()
        if text.strip():
            self.send_requested.emit(text)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if watched is self.input and event.type() == QEvent.Type.KeyPress:
            assert isinstance(event, QKeyEvent)
            key = event.key()
            if key in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and not (
                event.modifiers() & Qt.KeyboardModifier.ShiftModifier
            ):
                if not self._streaming:
                    self._submit()
                return True
            if key == Qt.Key.Key_Escape and self.editing:
                self.edit_cancelled.emit()
                return True
        return super().eventFilter(watched, event)
