"""Serving on the Open Inference Protocol (KServe V2): runtime, batcher, data plane, REST and gRPC."""

from __future__ import annotations
