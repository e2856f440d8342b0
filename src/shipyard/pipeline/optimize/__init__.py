"""Accuracy-guarded optimization: candidate transforms, the guards, and the search."""

from __future__ import annotations
