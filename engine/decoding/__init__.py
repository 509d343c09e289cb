"""Decoding: one request's tokens through the model, with prefix reuse and verification."""
