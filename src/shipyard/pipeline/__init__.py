"""The build pipeline: load → convert (and verify) → evaluate → publish."""

from __future__ import annotations

from shipyard.pipeline.runner import build, import_onnx

__all__ = ["build", "import_onnx"]
