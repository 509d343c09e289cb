"""Speculative decoding: drafters behind one interface, and the controller."""
