"""ead-dist: distributed dataset distillation by Effect Alignment."""

__version__ = "0.1.0"
