"""Structured output: JSON schemas checked and compiled to grammars, and the grammar state per request."""
