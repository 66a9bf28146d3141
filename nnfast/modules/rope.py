"""Placeholder: being written."""
RotaryEmbedding = None
