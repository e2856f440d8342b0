"""ONNX graphs and ONNX Runtime sessions, written once for the pipeline, the server, capacity and the benchmarks.

`session` is the only place a session is created, so what `build` and `capacity` time is what `serve` runs:
the same options, threads and providers.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from shipyard.dtypes import BY_ONNX, numpy_of
from shipyard.errors import ModelLoadError
from shipyard.spec.models import SignatureSpec, TensorSpec

MODEL_FILE = "model.onnx"
_SINGLE_FILE_LIMIT = 1_800_000_000  # below protobuf's 2 GiB message limit, with margin
_COPY_CHUNK = 64 << 20


def check_onnx(path: Path, runtime_ops: bool = False) -> onnx.ModelProto:
    """Load the graph (without external weights) after onnx.checker accepts it; ModelLoadError otherwise.

    `runtime_ops`: the graph uses ONNX Runtime's own operators (GroupQueryAttention,
    SimplifiedLayerNormalization, MatMulNBits), which onnx.checker does not know; ONNX Runtime validates it
    when it makes a session, which the caller does next."""
    try:
        if not runtime_ops:
            onnx.checker.check_model(str(path))
        return onnx.load(str(path), load_external_data=False)
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.shape_inference.InferenceError) as exc:
        raise ModelLoadError(f"{path}: not a valid ONNX model: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not ONNX at all
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type") or tensor.elem_type not in BY_ONNX:
        raise ModelLoadError(f"tensor {value.name!r}: only plain tensors of standard element types are supported")
    shape: list[int | str] = []
    for i, dim in enumerate(tensor.shape.dim):
        if dim.HasField("dim_value"):
            shape.append(dim.dim_value)
        else:
            shape.append(dim.dim_param or ("batch" if i == 0 else f"{value.name}_dim{i}"))
    return TensorSpec(name=value.name, dtype=BY_ONNX[tensor.elem_type].name, shape=shape)


def signature_of(model: onnx.ModelProto) -> SignatureSpec:
    """The graph's inputs (initializers excluded) and outputs as a SignatureSpec."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [_tensor_spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [_tensor_spec(v) for v in model.graph.output]
    return SignatureSpec(inputs=inputs, outputs=outputs)


def parameter_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(init.dims)) for init in model.graph.initializer)


def has_external_data(model: onnx.ModelProto) -> bool:
    return any(init.data_location == TensorProto.EXTERNAL for init in model.graph.initializer)


def uses_external_data(path: Path) -> bool:
    """Whether the ONNX file at `path` keeps its weights in side files (read without loading them)."""
    return has_external_data(onnx.load(str(path), load_external_data=False))


def save_graph(model: onnx.ModelProto, dest: Path, external: bool = False) -> Path:
    """Write a loaded graph: one file below protobuf's limit, else (or when `external`) its weights in one
    side file `dest.name + ".data"` beside it, the layout every ONNX tool here reads back."""
    if external or model.ByteSize() >= _SINGLE_FILE_LIMIT:
        onnx.save_model(model, str(dest), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{dest.name}.data", size_threshold=1024)  # fmt: skip
    else:
        onnx.save_model(model, str(dest))
    return dest


def model_files(path: Path) -> list[Path]:
    """An ONNX file and its side file of weights, when it has one."""
    data = path.with_name(f"{path.name}.data")
    return [path, data] if data.exists() else [path]


def model_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in model_files(path))


def remove_model(path: Path) -> None:
    for file in model_files(path):
        file.unlink(missing_ok=True)


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph can keep weights in: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def _external(tensor: onnx.TensorProto, base: Path) -> tuple[Path, int, int]:
    """Where an externally stored tensor's bytes are: file, offset, length; only files under `base`."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    file = (base / info.get("location", "")).resolve()
    if not file.is_relative_to(base) or not file.is_file():
        raise ModelLoadError(f"tensor {tensor.name!r}: its weights file {info.get('location')!r} is not a file "
                             "in the model's folder")  # fmt: skip
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else file.stat().st_size - offset
    if offset < 0 or length < 0 or offset + length > file.stat().st_size:
        raise ModelLoadError(f"tensor {tensor.name!r}: its weights run past the end of {file.name}")
    return file, offset, length


def save_streaming(model: onnx.ModelProto, source_dir: Path, dest: Path) -> Path:
    """Write `model` (a graph loaded without its external data) to `dest`, copying the bytes of every tensor
    stored outside it from its file under `source_dir` into one side file `dest.name + ".data"`, a chunk at a
    time: the weights are never all in memory, however big the model."""
    model = onnx.ModelProto.FromString(model.SerializeToString())  # the caller's graph keeps its locations
    base, data = source_dir.resolve(), f"{dest.name}.data"
    with (dest.parent / data).open("wb") as out:
        for tensor in _tensors(model.graph):
            if tensor.data_location != TensorProto.EXTERNAL:
                continue
            file, offset, length = _external(tensor, base)
            at = out.tell()
            with file.open("rb") as weights:
                weights.seek(offset)
                for start in range(0, length, _COPY_CHUNK):
                    out.write(weights.read(min(_COPY_CHUNK, length - start)))
            del tensor.external_data[:]
            for key, value in (("location", data), ("offset", str(at)), ("length", str(length))):
                tensor.external_data.add(key=key, value=value)
    onnx.save_model(model, str(dest))
    return dest


def _stored_bytes(model: onnx.ModelProto, base: Path) -> int:
    """The graph's own size plus every externally stored tensor's."""
    external = [t for t in _tensors(model.graph) if t.data_location == TensorProto.EXTERNAL]
    return int(model.ByteSize()) + sum(_external(t, base.resolve())[2] for t in external)


def place_model(source: Path, graph: onnx.ModelProto, dest: Path) -> Path:
    """Copy a checked ONNX model to `dest`, self-contained unless it exceeds protobuf's 2 GB (then its
    weights go to `model.onnx.data` beside it, streamed there without loading them).

    Exporters may write weights to side files; they are gathered here (only files in the model's own folder
    are read), so the artifact never depends on files outside it.
    """
    if source.resolve() == dest.resolve():
        return dest
    remove_model(dest)
    if not has_external_data(graph):
        shutil.copyfile(source, dest)
        return dest
    if _stored_bytes(graph, source.parent) >= _SINGLE_FILE_LIMIT:
        return save_streaming(graph, source.parent, dest)
    return save_graph(onnx.load(str(source), load_external_data=True), dest)


def providers(preferred: list[str] | None) -> list[str]:
    """The preferred execution providers that this machine's onnxruntime has, in order; CPU when none is."""
    available = set(ort.get_available_providers())
    chosen = [p for p in preferred or () if p in available]
    return chosen or ["CPUExecutionProvider"]


TENSORRT = "TensorrtExecutionProvider"
TENSORRT_FILE = "tensorrt.json"  # in an artifact: the TensorRT options its optimize search chose


@dataclass(frozen=True)
class TensorrtRun:
    """How the TensorRT provider runs a model: engines built in FP16 or not, kept in `cache` so that only
    the first session on a machine spends the minutes TensorRT takes to build them."""

    cache: Path
    fp16: bool = False

    def options(self) -> dict[str, str]:
        self.cache.mkdir(parents=True, exist_ok=True)
        return {
            "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(self.cache),
            "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(self.cache),
            "trt_fp16_enable": str(self.fp16),
        }  # fmt: skip


def artifact_tensorrt(folder: Path, content_hash: str, root: Path) -> TensorrtRun:
    """How the artifact in `folder` runs on TensorRT: FP16 when its search chose it (`tensorrt.json`, hashed
    and signed with the other files), engines cached per artifact under `root` ($SHIPYARD_TENSORRT_CACHE),
    since an engine belongs to one graph, GPU and TensorRT version."""
    chosen = folder / TENSORRT_FILE
    fp16 = bool(json.loads(chosen.read_text())["fp16"]) if chosen.exists() else False
    return TensorrtRun(root / content_hash.replace(":", "-")[:23], fp16)


def provider_list(chosen: list[str], tensorrt: TensorrtRun | None) -> list[str | tuple[str, dict[str, str]]]:
    """What InferenceSession takes: the chosen providers, TensorRT's with its options when it is among them."""
    return [(p, tensorrt.options()) if p == TENSORRT and tensorrt is not None else p for p in chosen]


def session(
    source: str | Path | bytes,
    threads: int = 1,
    preferred: list[str] | None = None,
    side_files: Mapping[str, bytearray] | None = None,
    tensorrt: TensorrtRun | None = None,
) -> ort.InferenceSession:
    """An ONNX Runtime session from a path or model bytes, with `threads` intra-op threads and one inter-op
    thread (so timings are comparable), on the preferred providers this machine has (default: CPU).
    `side_files`: weight files the graph references, by name, from memory (a decrypted model's); `tensorrt`:
    the TensorRT provider's options when it is used."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if side_files:
        names = list(side_files)
        buffers = [side_files[n] for n in names]
        options.add_external_initializers_from_files_in_memory(names, buffers, [len(b) for b in buffers])
    try:
        return ort.InferenceSession(
            source if isinstance(source, bytes) else str(source), options,
            providers=provider_list(providers(preferred), tensorrt),
        )  # fmt: skip
    except Exception as exc:  # onnxruntime raises its own unexported exception classes
        where = "the model" if isinstance(source, bytes) else source
        raise ModelLoadError(f"{where}: ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") from None


# Operators whose work is set by the values a request sends (trip counts, sizes, k), not by its shape alone.
VALUE_SIZED_OPS = frozenset({"Loop", "Scan", "If", "Range", "ConstantOfShape", "Expand", "Tile", "Resize", "Upsample",
                             "Pad", "TopK", "OneHot", "NonMaxSuppression", "Unique", "NonZero"})  # fmt: skip


def bounded_cost(model: onnx.ModelProto, signature: SignatureSpec) -> bool:
    """Whether a batch's cost is fixed by its batch size: every input's other dimensions fixed, no strings
    (tokenizing costs what the text is long), no operator sized by input values. Warm-up timings predict
    such a model's cost; another's cost is whatever a request makes it."""
    fixed = all(
        t.dtype != "string" and all(isinstance(d, int) for d in t.shape[1:]) for t in signature.inputs
    )  # fmt: skip

    def ops(graph: onnx.GraphProto) -> Iterator[str]:
        for node in graph.node:
            yield node.op_type
            for attribute in node.attribute:
                if attribute.g is not None and attribute.g.node:
                    yield from ops(attribute.g)

    return fixed and not any(op in VALUE_SIZED_OPS for op in ops(model.graph))


def is_batchable(signature: SignatureSpec) -> bool:
    """True when every input's first dimension is dynamic (the batch)."""
    return all(t.shape and isinstance(t.shape[0], str) for t in signature.inputs)


def random_feeds(signature: SignatureSpec, batch: int, seed: int = 0, other_dims: int = 8) -> dict[str, np.ndarray]:
    """Random inputs matching the signature: dim 0 (if dynamic) is `batch`, other dynamic dims `other_dims`."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for t in signature.inputs:
        shape = [d if isinstance(d, int) else (batch if i == 0 else other_dims) for i, d in enumerate(t.shape)]
        dtype = numpy_of(t.dtype)
        if t.dtype == "string":
            feeds[t.name] = np.array(["x"] * int(np.prod(shape)), dtype=object).reshape(shape)
        elif t.dtype == "bool":
            feeds[t.name] = rng.random(shape) > 0.5
        elif np.issubdtype(dtype, np.integer):
            feeds[t.name] = rng.integers(0, 10, size=shape).astype(dtype)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


_BATCH_CHUNK = 256  # samples per run when evaluating a batchable model over a whole dataset

Predict = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def ort_predict(sess: ort.InferenceSession) -> Predict:
    """A session's outputs as a list, in graph order."""
    return lambda feeds: list(sess.run(None, feeds))


def run_in_chunks(predict: Predict, feeds: dict[str, np.ndarray], signature: SignatureSpec) -> list[np.ndarray]:
    """Run `predict` over sample-major feeds and join the outputs: 256 samples a run, or one at a time
    for models without a dynamic batch dimension."""
    chunk = _BATCH_CHUNK if is_batchable(signature) else 1
    total = len(next(iter(feeds.values())))
    parts = [predict({k: v[i : i + chunk] for k, v in feeds.items()}) for i in range(0, total, chunk)]
    return [np.concatenate([np.asarray(p[j]) for p in parts]) for j in range(len(parts[0]))]
