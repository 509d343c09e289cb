"""GGUF files: header reading and the sandboxed chat template."""
