"""The data plane's domain types: requests, responses, metadata, configuration, statistics, the repository
index. No HTTP, no protobuf: each transport renders its own wire form from these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

Parameters = dict[str, Any]


@dataclass(slots=True)
class Tensor:
    """A named tensor with its V2 datatype: a request input or a response output."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    name: str
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class InferRequest:
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None = None  # None: every output
    id: str | None = None
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[Tensor]
    id: str | None = None
    parameters: Parameters = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    """A served tensor as the protocol's metadata describes it: -1 for dynamic dimensions."""

    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    name: str
    version: str
    extensions: list[str]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


@dataclass(frozen=True)
class ModelCard:
    """A served model as a listing shows it: the version that answers by default, and when it was built."""

    name: str
    version: str
    created_at: str  # ISO 8601, from the manifest


@dataclass(frozen=True, slots=True)
class ConfigTensor:
    """A tensor in Triton's model configuration: `dims` leave out the batch dimension of batched models."""

    name: str
    data_type: str  # TYPE_FP32, TYPE_STRING, …
    dims: list[int]


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What perf_analyzer and tritonclient read from a model's configuration."""

    name: str
    platform: str
    backend: str
    max_batch_size: int  # 0: the model takes no batch dimension, or batching is off
    inputs: list[ConfigTensor]
    outputs: list[ConfigTensor]
    instances: int
    preferred_batch_sizes: list[int]
    max_queue_delay_us: int
    dynamic_batching: bool


@dataclass(frozen=True, slots=True)
class Duration:
    count: int
    ns: int

    def __add__(self, other: Duration) -> Duration:
        return Duration(self.count + other.count, self.ns + other.ns)


@dataclass(frozen=True, slots=True)
class BatchStatistics:
    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


@dataclass(frozen=True, slots=True)
class ModelStatistics:
    """One loaded version's counters, as Triton's statistics extension reports them."""

    name: str
    version: str
    last_inference_ms: int
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    batches: list[BatchStatistics]

    def __add__(self, other: ModelStatistics) -> ModelStatistics:
        """The same version's counters on two workers, added up."""
        batches = {b.batch_size: b for b in self.batches}
        for b in other.batches:
            mine = batches.get(b.batch_size)
            batches[b.batch_size] = b if mine is None else BatchStatistics(
                b.batch_size, mine.compute_input + b.compute_input, mine.compute_infer + b.compute_infer,
                mine.compute_output + b.compute_output,
            )  # fmt: skip
        return ModelStatistics(
            self.name, self.version, max(self.last_inference_ms, other.last_inference_ms),
            self.inference_count + other.inference_count, self.execution_count + other.execution_count,
            self.success + other.success, self.fail + other.fail, self.queue + other.queue,
            self.compute_input + other.compute_input, self.compute_infer + other.compute_infer,
            self.compute_output + other.compute_output, [batches[size] for size in sorted(batches)],
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class RepositoryEntry:
    """A registered version and whether this server serves it (`reason` says why not, when known)."""

    name: str
    version: str
    state: str  # READY or UNAVAILABLE
    reason: str
