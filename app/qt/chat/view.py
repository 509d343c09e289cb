"""The Chat view's widgets, laid out; the ChatController drives them."""

from __future__ import annotations

from PySide6.QtWidgets import QHBoxLayout, QVBoxLayout, QWidget

from app.qt.chat.chat_list import ChatList
from app.qt.chat.conversation import Composer, ConversationView
from app.qt.chat.header import ChatHeader


class ChatView(QWidget):
    """Chats on the left; header, messages and composer on the right."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("page")
        root = QHBoxLayout(self)
        root.setContentsMargins(0, 0, 0, 0)
        root.setSpacing(0)
        self.chat_list = ChatList()
        root.addWidget(self.chat_list)
        main = QWidget()
        col = QVBoxLayout(main)
        col.setContentsMargins(0, 0, 0, 0)
        col.setSpacing(0)
        self.header = ChatHeader()
        col.addWidget(self.header)
        self.banner = QVBoxLayout()  # where the window puts the error banner on this page
        self.banner.setContentsMargins(28, 0, 28, 0)
        col.addLayout(self.banner)
        self.conversation = ConversationView()
        col.addWidget(self.conversation, 1)
        self.composer = Composer()
        col.addWidget(self.composer)
        root.addWidget(main, 1)
