"""Models that ship with the package (no downloads): used by the demo and the tests."""
from planner.models.gpt import GPTConfig, TinyGPT

__all__ = ["GPTConfig", "TinyGPT"]
