"""bnlab: run batch-normalization vs no-normalization experiments and read the answer."""

__version__ = "0.1.0"
