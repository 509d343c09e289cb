"""Wire types, declared once and split by concept (docs/api.md)."""
