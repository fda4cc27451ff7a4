"""The diffopt version (recorded in exported bundles)."""

__version__ = "0.1.0"
