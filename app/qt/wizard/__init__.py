"""The VRAM-budget wizard: its window, its bars and its controller (docs/app.md)."""
