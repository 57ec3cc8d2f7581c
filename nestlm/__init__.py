"""nestlm: hybrid attention / state-space / multi-timescale memory language models."""

__version__ = "0.1.0"
