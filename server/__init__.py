"""MTA (Merge-then-Adapt) personalization inference server."""

__version__ = "0.1.0"
