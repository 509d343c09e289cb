"""The llama.cpp backend: the only code that calls llama.cpp for inference."""
