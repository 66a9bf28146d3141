"""Placeholder: being written."""
LayerNorm = RMSNorm = None
