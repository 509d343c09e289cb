"""The Models view: a tab per way of getting models (the Library now); and its controller."""
