"""circuit atlas: a database of DifFRACT attribution circuits in FLUX-architecture models."""

__version__ = "0.1.0"
