"""Placeholder: being written."""
MLP = GatedMLP = SwiGLU = None
