"""Shipyard: from a trained model file to a production inference service."""

from __future__ import annotations

__version__ = "0.1.0"
