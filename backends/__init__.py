"""Switchyard backends: model repository, runtime adapters, the v2 worker."""

__version__ = "0.1.0"
