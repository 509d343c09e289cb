"""Qt-free services: chat store, engine client, library, downloads, settings."""
