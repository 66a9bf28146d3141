"""Thin ``nn.Module`` wrappers over ``nnfast.functional``."""
