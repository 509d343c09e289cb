"""Chats: the SQLite store and the service that sends, stops, regenerates and edits."""
