"""Serving: the HTTP server, the scheduler and `peregrine serve`."""
