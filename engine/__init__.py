"""Peregrine's engine: a headless, Qt-free process that serves GGUF models."""
