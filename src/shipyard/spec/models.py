"""The user-facing spec (`shipyard.yaml`), modelled once with pydantic.

Every model forbids unknown fields (a typo must be an error, not a silently ignored key) and is
frozen. Attribute docstrings become field descriptions in the JSON Schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from shipyard import settings as defaults

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
DType = Literal[
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "string",
]  # fmt: skip
Dim = Annotated[int, Field(ge=0)] | Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class TensorSpec(_Spec):
    """One named tensor of a model's signature."""

    name: str = Field(min_length=1)
    """Tensor name, as in the ONNX graph."""
    dtype: DType
    """Element type."""
    shape: list[Dim]
    """Dimensions; a string names a dynamic dimension (e.g. `batch`)."""


class SignatureSpec(_Spec):
    """A model's inputs and outputs."""

    inputs: list[TensorSpec] = Field(min_length=1)
    """Input tensors, in the order the model takes them."""
    outputs: list[TensorSpec] = Field(default_factory=list)
    """Output tensors; read from the converted graph when left empty."""

    @model_validator(mode="after")
    def _unique_names(self) -> SignatureSpec:
        names = [t.name for t in [*self.inputs, *self.outputs]]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"tensor names must be unique, repeated: {', '.join(duplicates)}")
        return self


class TokenizerSpec(_Spec):
    """A Hugging Face fast tokenizer in front of a graph that takes token ids, so clients send strings."""

    path: str
    """A tokenizer.json file (the `tokenizers` format), resolved against the spec's folder; copied into the artifact."""
    input: str = Field(default="text", pattern=r"^[A-Za-z_][\w.\-]*$")
    """Name of the string input that replaces the token-id inputs in the served signature."""
    max_length: int = Field(default=128, ge=1, le=8192)
    """Longer texts are truncated to this many tokens; shorter ones are padded to the longest in the batch."""


class SamplingDefaultsSpec(_Spec):
    """Sampling defaults for requests that leave them out; each one set here overrides the folder's
    generation_config.json (which transformers reads: without `do_sample: true` it decodes greedily)."""

    temperature: float | None = Field(default=None, ge=0, le=2)
    """0 decodes greedily."""
    top_p: float | None = Field(default=None, gt=0, le=1)
    """Nucleus sampling: draw from the most likely tokens that add up to this probability."""
    top_k: int | None = Field(default=None, ge=0)
    """Draw from the k most likely tokens (0: all)."""
    min_p: float | None = Field(default=None, ge=0, le=1)
    """Drop tokens less likely than this fraction of the most likely one."""
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    """Divide the positive logits (multiply the negative ones) of tokens already in the prompt or output."""


class GenerationSpec(_Spec):
    """How a causal language model (`format: huggingface`, `task: text-generation`) is served: the OpenAI
    API (/v1/completions, /v1/chat/completions), Triton's /generate routes and gRPC token streaming, all
    through one continuous-batching scheduler per model."""

    max_new_tokens: int = Field(default=256, ge=1, le=131072)
    """Default and upper bound of the tokens one request may generate (`max_tokens` asks for fewer)."""
    context: int | None = Field(default=None, ge=2, le=131072)
    """Longest prompt + generation; the model's own (`max_position_embeddings`) by default, which this may
    only lower. It sizes each cache slot."""
    max_running: int = Field(default=8, ge=1, le=256)
    """Sequences decoded together in one batched step (cache slots, each `context` positions long)."""
    kv_cache_mb: float | None = Field(default=None, gt=0)
    """Budget for the key/value cache: fewer slots than `max_running` are allocated when they would not fit."""
    max_waiting: int = Field(default=64, ge=1, le=100_000)
    """Requests waiting for a slot beyond the running ones; more are refused at once (429 on the OpenAI
    routes, 503 on the V2 ones)."""
    prefill_chunk: int = Field(default=256, ge=1, le=131072)
    """The most prompt tokens run between two decode steps."""
    prefill_pace: float = Field(default=2.0, ge=0, le=100)
    """While sequences are decoding, a prompt runs in pieces that take about this many decode steps' time
    (measured as the server runs, never below 16 tokens), so a new prompt delays the running sequences'
    next token by about that much instead of a whole chunk. Lower: steadier streams; higher: earlier first
    tokens and more throughput under a burst of new prompts. 0: whole chunks (docs/benchmarks.md)."""
    prefix_cache: int = Field(default=32, ge=0, le=4096)
    """Prompts whose key/value cache the server keeps (least recently used go first): a request whose prompt
    extends one of them computes only the rest, and one that shares a start with one (a system prompt)
    reuses the whole blocks of 16 positions they share. 0 turns it off."""
    sampling: SamplingDefaultsSpec | None = None
    """Sampling defaults (else the folder's generation_config.json, else OpenAI's: temperature 1, top_p 1)."""


HF_TASKS = ("text-generation", "feature-extraction", "text-classification")


class ModelSourceSpec(_Spec):
    """Where the trained model comes from."""

    format: Literal["torch", "onnx", "sklearn", "huggingface", "gguf"]
    """Source framework; `gguf`: a causal language model in a GGUF file (llama.cpp, Ollama, LM Studio)."""
    path: str | None = None
    """Model file: .onnx, TorchScript .pt, torch.export .pt2, or a scikit-learn .skops/.pkl/.joblib file; for
    `huggingface` a local folder as `save_pretrained` writes it (config.json, safetensors weights,
    tokenizer.json). Relative paths are resolved against the spec's folder."""
    task: Literal["text-generation", "feature-extraction", "text-classification"] | None = None
    """`huggingface` only: what the folder's model does. text-generation: a causal language model served
    token by token; feature-extraction: sentence embeddings (pooled as the folder's sentence-transformers
    config says, mean pooling otherwise); text-classification: class logits."""
    trust_remote_code: bool = False
    """`huggingface` only: allow a folder whose config names its own Python code (auto_map). That code runs
    at build time: only enable for folders you trust."""
    module: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    """PyTorch `package.module:Class` to instantiate (with `weights`), imported from the spec's folder."""
    init_args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the `module` class."""
    weights: str | None = None
    """State dict for `module`: .safetensors, or .pt/.pth loaded with torch.load(weights_only=True)."""
    trust_pickle: bool = False
    """Allow loading arbitrary pickles (full torch.save modules, .pkl/.joblib). Pickles run code on load:
    only enable for files you produced yourself."""
    signature: SignatureSpec | None = None
    """Input/output signature; required for torch, read from the graph for onnx and sklearn, from the model
    for huggingface."""
    tokenizer: TokenizerSpec | None = None
    """Serve a text model on strings: the tokenizer fills the graph's input_ids / attention_mask /
    token_type_ids inputs (evaluation datasets then give the texts under `tokenizer.input`)."""
    generation: GenerationSpec | None = None
    """Serving settings of a text-generation model (defaults apply when left out)."""
    dimensions: list[Annotated[int, Field(ge=1)]] | None = None
    """`feature-extraction` only: the sizes a Matryoshka-trained model's embeddings may be cut to; OpenAI's
    `dimensions` on /v1/embeddings may ask for one of them (the vector is cut and L2-normalised again), and is
    refused otherwise."""

    @model_validator(mode="after")
    def _source_is_complete(self) -> ModelSourceSpec:
        if self.module is not None:
            if self.format != "torch":
                raise ValueError("`module` is only for format: torch")
            if self.weights is None:
                raise ValueError("`module` needs `weights` (a .safetensors or .pt state dict)")
            if self.path is not None:
                raise ValueError("give either `path` or `module` + `weights`, not both")
        elif self.path is None:
            raise ValueError("`path` is required (or `module` + `weights` for format: torch)")
        if self.weights is not None and self.module is None:
            raise ValueError("`weights` goes with `module`")
        if self.format == "torch" and self.signature is None:
            raise ValueError("format: torch needs `signature.inputs` (names, dtypes and shapes to export)")
        if self.format == "gguf" and self.task not in (None, "text-generation"):
            raise ValueError("a GGUF file holds a language model: task text-generation (or leave `task` out)")
        if self.format != "gguf" and (self.format == "huggingface") != (self.task is not None):
            raise ValueError("format: huggingface needs `task` (text-generation, feature-extraction or "
                             "text-classification), and `task` is for huggingface folders only")  # fmt: skip
        if self.format in ("huggingface", "gguf") and (self.signature is not None or self.tokenizer is not None):
            raise ValueError(f"a {self.format} model brings its signature and tokenizer: leave those out")
        if self.trust_remote_code and self.format != "huggingface":
            raise ValueError("`trust_remote_code` is for huggingface folders")
        if self.generation is not None and not self.generates:
            raise ValueError("`generation` settings are for task: text-generation")
        if self.dimensions is not None and self.task != "feature-extraction":
            raise ValueError("`dimensions` are for task: feature-extraction (embedding models)")
        return self

    @property
    def generates(self) -> bool:
        return self.task == "text-generation" or self.format == "gguf"


class ToleranceSpec(_Spec):
    """Largest allowed difference between the original model and the converted one."""

    atol: float = Field(default=1e-4, ge=0)
    """Absolute tolerance."""
    rtol: float = Field(default=1e-3, ge=0)
    """Relative tolerance (numpy.allclose semantics: |a - b| <= atol + rtol * |b|)."""


class ConvertSpec(_Spec):
    """Conversion to ONNX and its verification."""

    opset: int = Field(default=18, ge=13, le=23)
    """ONNX opset to export to."""
    exporter: Literal["auto", "dynamo", "legacy"] = "auto"
    """torch.onnx exporter: `auto` tries dynamo first and falls back to the legacy TorchScript one."""
    tolerance: ToleranceSpec = Field(default_factory=ToleranceSpec)
    """Verification tolerance; the build fails above it. Unset, language models take atol 1e-3 (deep decoders'
    FP32 logits drift that far from PyTorch's), with greedy tokens equal at every position."""
    verify_samples: int = Field(default=64, ge=1, le=100_000)
    """How many samples both models run for the comparison."""


class SklearnDatasetSpec(_Spec):
    """A scikit-learn bundled dataset, split reproducibly."""

    kind: Literal["sklearn"]
    name: Literal["digits", "iris", "wine", "breast_cancer", "diabetes"]
    """Bundled dataset name (no download)."""
    split: Literal["test", "train", "all"] = "test"
    """Which part to use: the held-out `test` part by default."""
    test_size: float = Field(default=0.25, gt=0, lt=1)
    """Fraction held out, as in sklearn.model_selection.train_test_split."""
    seed: int = 0
    """random_state for the split (stratified for classification sets)."""


class NpzDatasetSpec(_Spec):
    """Arrays stored in a NumPy .npz file."""

    kind: Literal["npz"]
    path: str
    """File path, relative to the spec's folder."""
    inputs: dict[str, str] | None = None
    """Model input name -> array key; default: key `x` for a single-input model, else the input names."""
    target: str = "y"
    """Array key of the targets."""


class FunctionDatasetSpec(_Spec):
    """A Python function that returns `(inputs, targets)`."""

    kind: Literal["function"]
    ref: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    """`module:function`, imported from the spec's folder; returns (array or dict of arrays, targets)."""


class TextDatasetSpec(_Spec):
    """Held-out text for a language model: a UTF-8 file, one document per line (blank lines skipped)."""

    kind: Literal["text"]
    path: str
    """File path, relative to the spec's folder."""
    window: int = Field(default=128, ge=8, le=8192)
    """Tokens per scored window (documents are joined, then cut into windows of this length)."""


DatasetSpec = Annotated[
    SklearnDatasetSpec | NpzDatasetSpec | FunctionDatasetSpec | TextDatasetSpec, Field(discriminator="kind")
]

MetricName = Literal["accuracy", "f1", "iou", "mse", "mae", "cosine", "top_k", "perplexity"]
METRIC_DIRECTIONS: dict[str, Literal["maximize", "minimize"]] = {
    "accuracy": "maximize",
    "f1": "maximize",
    "iou": "maximize",
    "cosine": "maximize",
    "top_k": "maximize",
    "mse": "minimize",
    "mae": "minimize",
    "perplexity": "minimize",
}


class MetricSpec(_Spec):
    """Quality metric; a plain string such as `accuracy` is accepted as shorthand."""

    name: MetricName
    """accuracy / f1 (macro) / top_k on class scores or labels; iou (mean over classes) on per-pixel class
    scores (class axis last) or label masks; mse / mae / cosine on values; perplexity for language models
    (on a `text` dataset)."""
    k: int = Field(default=5, ge=1)
    """k for top_k."""
    direction: Literal["maximize", "minimize"] | None = None
    """Whether higher or lower is better; derived from the metric, and checked if given."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        # The schema says what the loader accepts: the shorthand too, or editors flag valid specs.
        return {"anyOf": [handler(schema), {"type": "string", "enum": list(METRIC_DIRECTIONS)}]}

    @model_validator(mode="after")
    def _direction_matches(self) -> MetricSpec:
        expected = METRIC_DIRECTIONS[self.name]
        if self.direction is not None and self.direction != expected:
            raise ValueError(f"{self.name} is better when higher/lower as `{expected}`, not `{self.direction}`")
        return self

    @property
    def better(self) -> Literal["maximize", "minimize"]:
        return METRIC_DIRECTIONS[self.name]


class LatencySpec(_Spec):
    """In-process ONNX Runtime timing done during evaluation."""

    iterations: int = Field(default=200, ge=1, le=1_000_000)
    """Timed batch-1 runs (after warm-up) for the p50/p99 latency."""
    throughput_batch: int = Field(default=64, ge=1, le=65536)
    """Batch size for the throughput figure."""
    threads: int = Field(default=1, ge=0)
    """ONNX Runtime intra-op threads (0 lets ONNX Runtime choose)."""


class EvaluationSpec(_Spec):
    """How the model is judged: a held-out dataset and a metric."""

    dataset: DatasetSpec
    """Evaluation data."""
    metric: MetricSpec
    """Quality metric: its name, or {name, k, direction}."""
    output: str | None = None
    """Output tensor the metric reads; the first output by default."""
    max_samples: int | None = Field(default=None, ge=1)
    """Cap on evaluated samples (the first N)."""
    latency: LatencySpec = Field(default_factory=LatencySpec)
    """Timing settings."""


TORCH_STEPS = ("prune", "distill")
"""Steps that change the PyTorch model before it is exported; they come before the ONNX steps."""


class OptimizeStepSpec(_Spec):
    """One optimization step and its parameters."""

    step: Literal["prune", "distill", "graph", "quantize_dynamic", "quantize_static", "weight_only", "fp16", "tensorrt"]
    """prune: PyTorch magnitude pruning (`method: magnitude`, zeroed weights) or structured channel
    removal (`method: channels`, a smaller model); distill: train the `student` architecture on the
    teacher's soft targets; graph: ONNX Runtime offline graph optimization; quantize_dynamic /
    quantize_static: INT8 (static uses calibration data, QDQ format); weight_only: 4/8-bit MatMul weights
    (MatMulNBits); fp16: half-precision weights and compute; tensorrt (last, with `serve.device: tensorrt`):
    the same graph run by TensorRT engines built in FP16 (`fp16: false`: FP32), tried only where the building
    machine has the TensorRT provider; when accepted the artifact carries the choice and the server builds its
    engines once per machine into an engine cache."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Step parameters (prune: method, amount, finetune_epochs, ignore; distill: student, epochs, lr,
    batch_size, temperature, alpha; graph: level, transformer; quantize_*: per_channel, weight_type,
    nodes_to_exclude; static: method MinMax/Entropy/Percentile, calibration_samples; weight_only: bits,
    block_size, accuracy_level, algorithm rtn/k_quant/hqq, symmetric (rtn), head_bits (a language model's
    output projection), nodes_to_exclude, nodes_to_quantize; fp16: keep_io_types; tensorrt: fp16)."""

    @property
    def trains(self) -> bool:
        """Whether the step trains on `optimize.train_data` (distillation, or fine-tuning after pruning)."""
        return self.step == "distill" or (self.step == "prune" and bool(self.params.get("finetune_epochs", 0)))


class OptimizeSpec(_Spec):
    """Search for the fastest variant that keeps the metric within budget."""

    steps: list[OptimizeStepSpec] = Field(min_length=1)
    """Steps to try, in order; each accepted step becomes the parent of the next."""
    train_data: DatasetSpec | None = None
    """Training data for distillation and fine-tuning (labels optional: the teacher's outputs are the
    targets), and the calibration inputs of static quantization (else the evaluation inputs are used).
    Must not be the evaluation set, or the guard would judge a model on what it learned."""
    max_drop: float = Field(default=0.01, ge=0)
    """Largest allowed metric loss versus the unoptimized model (absolute, or a fraction with `relative`)."""
    relative: bool = False
    """Read `max_drop` as a fraction of the unoptimized model's metric."""
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    """The drop's bootstrap upper bound at this confidence must stay within budget."""
    bootstrap: int = Field(default=500, ge=50, le=100_000)
    """Bootstrap resamples of the evaluation set."""
    objective: Literal["latency", "size", "memory"] = "latency"
    """What a candidate must improve to replace its parent: `latency` (p50 at `speed_batch`; for language
    models the decode step), `size` (bytes of the model: on a CPU without fast INT4 kernels a 4-bit model
    may be no faster but 4x smaller) or, for language models, `memory` (the peak resident memory a fresh
    process adds to load it and run one decode step of every cache slot). Other models: latency only."""
    min_token_agreement: float = Field(default=0.9, ge=0, le=1)
    """Language models: the share of held-out positions where a candidate's greedy next token must equal the
    unoptimized model's, counted where that model has decided (its top token at least twice as likely as the
    runner-up; a model that decides nowhere, as random weights do, is judged by perplexity alone)."""
    min_speedup: float = Field(default=0.05, ge=0)
    """A candidate must be at least this fraction faster (p50 at `speed_batch`) than its parent."""
    speed_batch: int = Field(default=1, ge=1, le=4096)
    """Batch size candidates are timed at: 1 for latency-bound services, larger for throughput."""
    max_trials: int = Field(default=16, ge=1)
    """Most candidates to try (fallback retries count)."""
    fallback_trials: int = Field(default=4, ge=0)
    """When a quantized candidate loses too much, retry it keeping the 1, 2, 4, … worst nodes in float."""
    timeout_s: float = Field(default=1800, gt=0)
    """Stop trying new candidates after this long; the best so far is kept."""

    @model_validator(mode="after")
    def _torch_steps_first(self) -> OptimizeSpec:
        names = [s.step for s in self.steps]
        last_torch = max((i for i, n in enumerate(names) if n in TORCH_STEPS), default=-1)
        first_onnx = min((i for i, n in enumerate(names) if n not in TORCH_STEPS), default=len(names))
        if last_torch > first_onnx:
            raise ValueError("prune and distill change the PyTorch model: list them before the ONNX steps")
        if any(s.trains for s in self.steps) and self.train_data is None:
            raise ValueError("distill and fine-tuning (finetune_epochs) need `train_data`")
        return self


DEVICE_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class ServeSpec(_Spec):
    """Serving settings used by `shipyard serve`."""

    max_batch_size: int = Field(default=64, ge=0)
    """Largest batch the dynamic batcher forms (0 disables batching)."""
    max_queue_delay_ms: float = Field(default=0.0, ge=0)
    """Longest a request waits for others to join its batch."""
    preferred_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)
    """Batch sizes the batcher aims for."""
    max_queue_size: int = Field(default=1024, ge=1)
    """Requests queued per model before new ones are refused (503)."""
    instances: int = Field(default=1, ge=1, le=64)
    """Model instances (sessions) run in parallel."""
    intra_op_threads: int | None = Field(default=None, ge=0)
    """ONNX Runtime intra-op threads per instance (0 lets ONNX Runtime choose: one per core). By default 1
    for models served through the dynamic batcher (instances run in parallel instead) and 0 for language
    models (one decode step at a time, on every core)."""

    workers: Annotated[int, Field(ge=1, le=512)] | Literal["auto"] = 1
    """Processes of `shipyard serve` answering on the same ports (`--workers`, rendered into the local, Docker,
    Kubernetes and KServe targets): each loads every model with its own sessions, batchers and key/value
    cache. `auto`: one per usable CPU, as many as fit in memory. Ray scales replicas instead."""

    def threads(self, generates: bool) -> int:
        if self.intra_op_threads is not None:
            return self.intra_op_threads
        return 0 if generates else 1

    inline_max_ms: float = Field(default=5.0, ge=0)
    """Models whose largest batch runs faster than this (timed at warm-up) run on the event-loop thread,
    saving a thread hop per batch; 0 always uses worker threads."""
    device: Literal["cpu", "cuda", "tensorrt"] = "cpu"
    """Where the model runs: the CPU, or an NVIDIA GPU through ONNX Runtime's CUDA or TensorRT provider. It
    decides the providers (unless `execution_providers` names them), the rendered image (`onnxruntime-gpu`
    on a CUDA base image), the GPU requests of the Kubernetes, KServe and Ray targets, and where the build's
    evaluation, the optimization search and `shipyard capacity` time the model (on the CPU when the machine
    building it lacks the provider; the lineage records which); the server refuses to load the model where
    that provider is missing rather than run it on the CPU."""
    execution_providers: list[str] | None = None
    """Providers in order of preference (those not available on the machine are skipped); by default the
    device's: CPU; CUDA then CPU; TensorRT, CUDA, then CPU."""

    def providers(self) -> list[str]:
        return self.execution_providers or DEVICE_PROVIDERS[self.device]

    @model_validator(mode="after")
    def _preferred_fit(self) -> ServeSpec:
        too_big = [b for b in self.preferred_batch_sizes if b > self.max_batch_size]
        if too_big:
            raise ValueError(f"preferred_batch_sizes {too_big} exceed max_batch_size {self.max_batch_size}")
        return self


QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$"
_UNITS = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str) -> float:
    """A Kubernetes quantity as a number (`500m` -> 0.5, `1Gi` -> 1073741824)."""
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * _UNITS[suffix]
    return float(value)


class ResourcesSpec(_Spec):
    """Kubernetes-style resource quantities for one replica (requests; limits default to the same)."""

    cpu: str = Field(default="1", pattern=QUANTITY_PATTERN)
    """CPU request, e.g. `500m` or `2`."""
    memory: str = Field(default="1Gi", pattern=QUANTITY_PATTERN)
    """Memory request, e.g. `512Mi`."""
    cpu_limit: str | None = Field(default=None, pattern=QUANTITY_PATTERN)
    """CPU limit (none by default: throttling hurts tail latency more than sharing)."""
    memory_limit: str | None = Field(default=None, pattern=QUANTITY_PATTERN)
    """Memory limit; the memory request when not given."""
    gpu: int = Field(default=0, ge=0, le=16)
    """NVIDIA GPUs per replica (`nvidia.com/gpu`, Ray `num_gpus`); 1 when `serve.device` is a GPU and this is 0."""

    @model_validator(mode="after")
    def _possible(self) -> ResourcesSpec:
        if quantity(self.cpu) < 0.1:
            raise ValueError(f"cpu {self.cpu} is below 100m: a model server cannot run on it")
        if quantity(self.memory) < 128 * 2**20:
            raise ValueError(f"memory {self.memory} is below 128Mi: the server alone needs more")
        if self.memory_limit is not None and quantity(self.memory_limit) < quantity(self.memory):
            raise ValueError(f"memory_limit {self.memory_limit} is below the request {self.memory}")
        if self.cpu_limit is not None and quantity(self.cpu_limit) < quantity(self.cpu):
            raise ValueError(f"cpu_limit {self.cpu_limit} is below the request {self.cpu}")
        return self


class MachineSpec(_Spec):
    """The machine type replicas run on: what one node offers to pods (its allocatable resources)."""

    type: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Its name, e.g. `m7i.2xlarge`: the plan names it, and the Kubernetes and KServe targets schedule onto
    it (node selector `node.kubernetes.io/instance-type`)."""
    cpu: str = Field(pattern=QUANTITY_PATTERN)
    """CPUs one node offers to pods."""
    memory: str = Field(pattern=QUANTITY_PATTERN)
    """Memory one node offers to pods."""
    gpus: int = Field(default=0, ge=0, le=64)
    """NVIDIA GPUs per node."""
    gpu_memory: str | None = Field(default=None, pattern=QUANTITY_PATTERN)
    """Memory of one of its GPUs."""


class PortsSpec(_Spec):
    """Ports the server listens on inside a container or on the local machine."""

    http: int = Field(default=defaults.HTTP_PORT, ge=1, le=65535)
    """REST (Open Inference Protocol)."""
    grpc: int = Field(default=defaults.GRPC_PORT, ge=1, le=65535)
    """gRPC (GRPCInferenceService)."""
    metrics: int = Field(default=defaults.METRICS_PORT, ge=1, le=65535)
    """Prometheus metrics."""

    @model_validator(mode="after")
    def _distinct(self) -> PortsSpec:
        if len({self.http, self.grpc, self.metrics}) != 3:
            raise ValueError("http, grpc and metrics ports must differ")
        return self


class DeploySpec(_Spec):
    """Deployment settings used by `shipyard plan / apply / deploy`."""

    target: Literal["local", "docker", "kubernetes", "kserve", "ray"] = "local"
    """Where to deploy."""
    models: list[str] = Field(default_factory=list)
    """Versions to serve (NAME, NAME:VERSION, NAME@ALIAS); the spec's model at its latest version by default.
    Each release pins the versions these resolve to."""
    registry_uri: str | None = None
    """Storage URI folder (s3://bucket/models/, file://…) the server pulls the archives from at start;
    without it the models are baked into the image / context."""
    min_replicas: int = Field(default=1, ge=0)
    """Fewest replicas."""
    max_replicas: int = Field(default=1, ge=1)
    """Most replicas."""
    target_cpu_percent: int = Field(default=70, ge=1, le=100)
    """Kubernetes HPA: average CPU utilisation to scale at."""
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    """Ray Serve autoscaling: in-flight requests per replica to scale at."""
    canary_percent: int | None = Field(default=None, ge=0, le=100)
    """KServe: share of traffic the new release gets while the previous one keeps the rest."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Per-replica resources."""
    machine: MachineSpec | None = None
    """The machine type the replicas run on: `shipyard capacity --spec` says how many replicas one holds and
    how many machines the plan needs, or that a replica does not fit it."""
    ports: PortsSpec = Field(default_factory=PortsSpec)
    """Server ports."""
    image: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9._/:@-]*$")
    """Container image (kubernetes, kserve: required; docker: the tag to build, `shipyard-NAME:latest` by default)."""
    namespace: str = Field(default="default", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    """Kubernetes namespace."""
    output: str = "deploy"
    """Folder (relative to the spec) where `apply` writes the rendered files; releases are kept in
    `.shipyard/releases` next to the spec."""

    @model_validator(mode="after")
    def _consistent(self) -> DeploySpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if self.target in ("kubernetes", "kserve") and self.image is None:
            raise ValueError(f"target {self.target} needs `image`: the container image the cluster pulls")
        return self


class ShipyardSpec(_Spec):
    """A `shipyard.yaml`: one model from file to service."""

    version: Literal[1] = 1
    """Spec format version."""
    name: str = Field(pattern=NAME_PATTERN)
    """Model name in the registry (letters, digits, `_.-`)."""
    description: str = ""
    """Free text stored in the manifest."""
    model: ModelSourceSpec
    """The trained model to ship."""
    convert: ConvertSpec = Field(default_factory=ConvertSpec)
    """Conversion to ONNX."""
    evaluation: EvaluationSpec | None = None
    """Held-out evaluation; without it only conversion and timing run."""
    optimize: OptimizeSpec | None = None
    """Accuracy-guarded optimization (needs `evaluation`)."""
    serve: ServeSpec = Field(default_factory=ServeSpec)
    """Serving settings."""
    deploy: DeploySpec = Field(default_factory=DeploySpec)
    """Deployment settings."""

    @model_validator(mode="after")
    def _optimize_needs_evaluation(self) -> ShipyardSpec:
        if self.optimize is not None and self.evaluation is None:
            raise ValueError("`optimize` needs an `evaluation` section: candidates are judged on it")
        if self.optimize is not None and self.evaluation is not None:
            if any(s.step in TORCH_STEPS for s in self.optimize.steps) and self.model.format != "torch":
                raise ValueError("prune and distill work on PyTorch models (model.format: torch)")
            names = [s.step for s in self.optimize.steps]
            if "tensorrt" in names and (names.index("tensorrt") != len(names) - 1 or self.serve.device != "tensorrt"):
                raise ValueError("the tensorrt step chooses how TensorRT runs the final graph: list it last, "
                                 "with serve.device: tensorrt")  # fmt: skip
            if self.optimize.train_data == self.evaluation.dataset:
                raise ValueError("optimize.train_data is the evaluation set: train on other data than the guard")
            if self.optimize.objective != "latency" and not self.model.generates:
                raise ValueError(f"optimize.objective {self.optimize.objective} is for language models; the search "
                                 "of other models keeps the fastest variant (objective: latency)")  # fmt: skip
            if self.model.generates:
                allowed = {"quantize_dynamic", "weight_only"}
                other = sorted({s.step for s in self.optimize.steps} - allowed)
                if other:
                    raise ValueError(f"a language model's search takes quantize_dynamic and weight_only, not {other}")
        if self.evaluation is not None:
            text = self.evaluation.dataset.kind == "text" or self.evaluation.metric.name == "perplexity"
            if text and not (self.evaluation.dataset.kind == "text" and self.evaluation.metric.name == "perplexity"
                             and self.model.generates):  # fmt: skip
                raise ValueError("perplexity on a `text` dataset is how language models are judged, and only them")
            if self.model.generates and not text:
                raise ValueError("a text-generation model is judged by perplexity on a `kind: text` dataset")
        return self


def resolve_path(base: Path, value: str) -> Path:
    """A spec path made absolute against the spec's folder (`file://` URIs accepted)."""
    if value.startswith("file://"):
        value = value[len("file://") :]
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path)
