"""Attention over an arbitrary keep-set with score modifiers: the PyTorch reference every
attend kernel is checked against, and the CPU path of ``sparse.attend``."""
from .reference import apply_modifiers, attention_reference, positions_offset

__all__ = ["apply_modifiers", "attention_reference", "positions_offset"]
