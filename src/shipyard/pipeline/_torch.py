"""PyTorch sources: TorchScript, torch.export programs, class + weights; export to ONNX.

torch is imported lazily through `require`, so nothing here costs anything without the extra.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from shipyard._extras import require
from shipyard.dtypes import numpy_of
from shipyard.errors import ConversionError, ModelLoadError, SpecError, UnsafeModelError
from shipyard.pipeline._imports import import_object, on_sys_path
from shipyard.pipeline._picklescan import refuse_untrusted_globals
from shipyard.pipeline.context import ExportResult
from shipyard.spec.models import ConvertSpec, ModelSourceSpec, SignatureSpec, resolve_path

_EXAMPLE_DYNAMIC_SIZE = 2  # torch.export specializes dimensions of size 0 and 1
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _torch() -> Any:
    return require("torch", "torch", "Loading PyTorch models")


def _plain(text: str) -> str:
    """Text without the terminal colour codes torch's exporters put in their messages."""
    return _ANSI.sub("", text)


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Swallow the exporters' console chatter; the caller may show it on failure."""
    buffer = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(buffer),
            contextlib.redirect_stderr(buffer),
        ):
            warnings.simplefilter("ignore")
            yield buffer
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())
    except zipfile.BadZipFile:
        return False


_PICKLE_REFUSAL = (
    "{path} holds pickled Python objects (e.g. a whole module saved with torch.save); unpickling runs "
    "arbitrary code, so it is refused. Save it with torch.jit.save, torch.export.save or as a state dict "
    "(module + weights), or set `trust_pickle: true` if you produced this file yourself."
)


def _load_state_dict(torch: Any, path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        safetensors_torch = require("safetensors.torch", "torch", "Reading .safetensors weights")
        try:
            return dict(safetensors_torch.load_file(str(path)))
        except Exception as exc:  # safetensors raises SafetensorError, not exported under a stable name
            raise ModelLoadError(f"{path}: not a readable safetensors file: {exc}") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UnsafeModelError(_PICKLE_REFUSAL.format(path=path)) from None
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable PyTorch weights file: {exc}") from None
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state


def _load_module(source: ModelSourceSpec, base_dir: Path) -> tuple[Any, str]:
    torch = _torch()
    if source.module is not None:
        assert source.weights is not None  # the spec validator guarantees it
        cls = import_object(source.module, base_dir)
        try:
            module = cls(**source.init_args)
        except Exception as exc:
            raise ModelLoadError(f"{source.module}(**init_args) failed: {type(exc).__name__}: {exc}") from None
        weights = resolve_path(base_dir, source.weights)
        if not weights.is_file():
            raise ModelLoadError(f"weights file not found: {weights}")
        try:
            module.load_state_dict(_load_state_dict(torch, weights), strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"{weights} does not fit {source.module}: {str(exc).splitlines()[0]}") from None
        return module, "module+weights"
    assert source.path is not None
    path = resolve_path(base_dir, source.path)
    if path.suffix == ".pt2":
        try:
            return torch.export.load(str(path)), "torch.export"
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a readable torch.export program: {exc}") from None
    if _is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location="cpu"), "torchscript"
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a readable TorchScript file: {exc}") from None
    if not source.trust_pickle:
        try:
            torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise UnsafeModelError(_PICKLE_REFUSAL.format(path=path)) from None
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a TorchScript, torch.export or PyTorch file: {exc}") from None
        raise ModelLoadError(f"{path} is a state dict, not a model: give `module: pkg.mod:Class` and `weights:`")
    refuse_untrusted_globals(path, base_dir)
    try:
        with on_sys_path(base_dir):  # the pickle names the user's classes by module path
            module = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot load pickled module: {exc}") from None
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"{path}: unpickled a {type(module).__name__}, not a torch.nn.Module")
    return module, "pickle"


class TorchSource:
    """A PyTorch model in eval mode."""

    framework = "torch"

    def __init__(self, module: Any, kind: str, program: Any = None) -> None:
        self._torch = _torch()
        self.module, self.kind, self._program = module, kind, program
        if hasattr(self.module, "eval") and self._program is None:
            self.module.eval()

    @classmethod
    def load(cls, source: ModelSourceSpec, base_dir: Path) -> TorchSource:
        loaded, kind = _load_module(source, base_dir)
        if kind == "torch.export":
            return cls(loaded.module(), kind, program=loaded)
        return cls(loaded, kind)

    def parameter_count(self) -> int:
        return int(sum(p.numel() for p in self.module.parameters()))

    def predict(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        args = [torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()]
        with torch.no_grad():  # not inference_mode: TorchScript modules reject inference tensors
            out = self.module(*args)
        outputs = list(out) if isinstance(out, (tuple, list)) else [out]
        return [o.detach().cpu().numpy() for o in outputs]

    def _example(self, signature: SignatureSpec) -> tuple[Any, ...]:
        torch = self._torch
        tensors = []
        for t in signature.inputs:
            shape = [d if isinstance(d, int) else _EXAMPLE_DYNAMIC_SIZE for d in t.shape]
            tensors.append(torch.from_numpy(np.zeros(shape, dtype=numpy_of(t.dtype))))
        return tuple(tensors)

    def _output_names(self, signature: SignatureSpec, example: tuple[Any, ...]) -> list[str]:
        if signature.outputs:
            return [t.name for t in signature.outputs]
        count = len(self.predict({t.name: e.numpy() for t, e in zip(signature.inputs, example, strict=True)}))
        return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]

    def _export(self, exporter: str, dest: Path, signature: SignatureSpec, convert: ConvertSpec) -> None:
        torch = self._torch
        example = self._example(signature)
        input_names = [t.name for t in signature.inputs]
        output_names = self._output_names(signature, example)
        common: dict[str, Any] = {
            "input_names": input_names,
            "output_names": output_names,
            "opset_version": convert.opset,
            "verbose": False,
        }
        if exporter == "dynamo":
            if self._program is not None:
                torch.onnx.export(self._program, example, str(dest), dynamo=True, **common)
                return
            dims = {n: torch.export.Dim(n) for t in signature.inputs for n in t.shape if isinstance(n, str)}
            shapes = tuple({i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in signature.inputs)
            torch.onnx.export(self.module, example, str(dest), dynamo=True, dynamic_shapes=shapes, **common)
        else:
            axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in signature.inputs}
            for t in signature.outputs:
                axes[t.name] = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            torch.onnx.export(self.module, example, str(dest), dynamo=False, dynamic_axes=axes, **common)

    def _check_signature(self, signature: SignatureSpec) -> None:
        """SpecError in the spec's terms when the module cannot run on inputs shaped as the signature says:
        the exporters would fail on it too, with pages of their own log."""
        example = self._example(signature)
        try:
            with self._torch.no_grad():
                self.module(*example)
        except Exception as exc:
            shapes = ", ".join(
                f"{t.name} {t.dtype} {list(e.shape)}" for t, e in zip(signature.inputs, example, strict=True)
            )
            lines = [line for line in _plain(str(exc)).splitlines() if line.strip()] or [type(exc).__name__]
            raise SpecError(
                f"model.signature: the model cannot run on inputs shaped like the signature ({shapes}): {lines[-1]}. "
                "Make model.signature.inputs match what its forward() takes (dynamic dimensions are tried as "
                f"{_EXAMPLE_DYNAMIC_SIZE})"
            ) from None

    def export_onnx(self, dest: Path, signature: SignatureSpec, convert: ConvertSpec) -> ExportResult:
        self._check_signature(signature)
        is_script = isinstance(self.module, self._torch.jit.ScriptModule)
        # The dynamo exporter cannot trace TorchScript; go straight to the exporter that can.
        order = {
            "auto": ["legacy"] if is_script else ["dynamo", "legacy"],
            "dynamo": ["dynamo"],
            "legacy": ["legacy"],
        }
        failures = []
        for exporter in order[convert.exporter]:
            with _quiet() as chatter:
                try:
                    self._export(exporter, dest, signature, convert)
                except Exception as exc:
                    tail = " | ".join(_plain(chatter.getvalue()).strip().splitlines()[-3:])
                    failures.append(
                        f"{exporter}: {type(exc).__name__}: {_plain(str(exc)).splitlines()[0] if str(exc) else ''}"
                        + (f" [{tail}]" if tail else "")
                    )
                    continue
            return ExportResult(dest, {"exporter": exporter, "opset": convert.opset, "source_kind": self.kind})
        raise ConversionError("torch.onnx.export failed: " + "; ".join(failures))
