"""The PyTorch steps: pruning and distillation change the model before it is exported to ONNX.

`torch.nn.utils.prune` zeroes the smallest weights (unstructured: same shapes, so no faster on dense
kernels). Torch-Pruning's dependency graph removes whole channels together with the slices of every
layer that consumes them, so the exported graph is really smaller. Fine-tuning after pruning and
distillation both train on the parent model's outputs (soft targets), so training data needs no labels;
when it has class labels, `alpha` mixes in the usual cross-entropy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shipyard._extras import require
from shipyard.errors import InvalidInputError
from shipyard.onnxrt import MODEL_FILE, check_onnx, place_model
from shipyard.pipeline._imports import import_object
from shipyard.pipeline._torch import TorchSource
from shipyard.pipeline.context import EvalData
from shipyard.pipeline.optimize.transforms import check_params
from shipyard.spec.models import ConvertSpec, SignatureSpec

_CLASSIFICATION_METRICS = ("accuracy", "f1", "top_k")


def _fraction(params: dict[str, Any], key: str, default: float, step: str) -> float:
    value = float(params.get(key, default))
    if not 0 < value < 1:
        raise InvalidInputError(f"optimize step {step}: {key} must be between 0 and 1 (exclusive), not {value}")
    return value


@dataclass(frozen=True)
class Training:
    """How the steps train: data, the output the metric reads, and the loss that matches it."""

    data: EvalData | None
    output: int
    metric: str

    @property
    def loss(self) -> str:
        """KL divergence on softened class scores for classification metrics, mean squared error otherwise."""
        return "kl" if self.metric in _CLASSIFICATION_METRICS else "mse"

    def require(self, step: str) -> EvalData:
        if self.data is None:
            raise InvalidInputError(f"optimize step {step} trains: set optimize.train_data")
        return self.data


def _select(out: Any, index: int) -> Any:
    return out[index] if isinstance(out, (tuple, list)) else out


def _fit(student: Any, teacher: Any, steps: TorchSteps, params: dict[str, Any], epochs: int, step: str) -> float:
    """Train `student` on `teacher`'s outputs for `epochs`; returns the last epoch's mean loss."""
    torch = require("torch", "torch", "training")
    training = steps.training
    data = training.require(step)
    functional = torch.nn.functional
    torch.manual_seed(int(params.get("seed", 0)))
    inputs = [torch.from_numpy(np.ascontiguousarray(v)) for v in data.inputs.values()]
    batch, count = int(params.get("batch_size", 64)), len(data)
    with torch.no_grad():
        chunks = [_select(teacher(*[x[i : i + 256] for x in inputs]), training.output) for i in range(0, count, 256)]
    soft = torch.cat(chunks)
    labels = torch.from_numpy(data.target.astype(np.int64)) if np.issubdtype(data.target.dtype, np.integer) else None
    temperature = float(params.get("temperature", 2.0))
    alpha = float(params.get("alpha", 0.5)) if training.loss == "kl" and labels is not None else 0.0
    optimizer = torch.optim.Adam(student.parameters(), lr=float(params.get("lr", 1e-3)))
    student.train()
    mean = float("nan")  # the last epoch's mean loss, rounded for the report
    for epoch in range(epochs):
        order, total = torch.randperm(count), 0.0
        for start in range(0, count, batch):
            idx = order[start : start + batch]
            out = _select(student(*[x[idx] for x in inputs]), training.output)
            if training.loss == "kl":
                loss = functional.kl_div(
                    functional.log_softmax(out / temperature, dim=-1),
                    functional.softmax(soft[idx] / temperature, dim=-1),
                    reduction="batchmean",
                ) * (temperature**2)
                if alpha > 0 and labels is not None:
                    loss = (1 - alpha) * loss + alpha * functional.cross_entropy(out, labels[idx])
            else:
                loss = functional.mse_loss(out, soft[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        mean = round(total / count, 5)
        steps.on_epoch((epoch + 1) / epochs)
    student.eval()
    return mean


def _weighted_layers(torch: Any, module: Any, example: tuple[Any, ...]) -> list[Any]:
    """Leaf modules with a weight, in the order the forward pass runs them."""
    order: list[Any] = []
    leaves = [m for m in module.modules() if not list(m.children()) and getattr(m, "weight", None) is not None]
    hooks = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod)) for m in leaves]
    try:
        with torch.no_grad():
            module(*example)
    finally:
        for hook in hooks:
            hook.remove()
    return list(dict.fromkeys(order))


def _parameters(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def prune(parent: Any, params: dict[str, Any], steps: TorchSteps) -> tuple[Any, dict[str, Any]]:
    """Magnitude (unstructured) or channel (structured) pruning, then optional fine-tuning on the parent."""
    torch = require("torch", "torch", "pruning")
    check_params(params, {"method", "amount", "finetune_epochs", "lr", "batch_size", "temperature", "alpha", "seed",
                    "ignore"}, "prune")  # fmt: skip
    method = params.get("method", "channels")
    amount = _fraction(params, "amount", 0.5, "prune")
    epochs = int(params.get("finetune_epochs", 0))
    model = copy.deepcopy(parent)
    applied: dict[str, Any] = {"method": method, "amount": amount, "parameters_before": _parameters(parent)}
    if method == "magnitude":
        utils = require("torch.nn.utils.prune", "torch", "pruning")
        kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
        layers = [(m, "weight") for m in model.modules() if isinstance(m, kinds)]
        utils.global_unstructured(layers, pruning_method=utils.L1Unstructured, amount=amount)
        if epochs:  # the masks stay on while fine-tuning, so pruned weights stay zero
            applied["finetune_loss"] = _fit(model, parent, steps, params, epochs, "prune")
        for layer, name in layers:
            utils.remove(layer, name)
        zeros = sum(int((m.weight == 0).sum()) for m, _ in layers)
        applied["sparsity"] = round(zeros / max(1, sum(m.weight.numel() for m, _ in layers)), 4)
    elif method == "channels":
        tp = require("torch_pruning", "torch", "structured pruning")
        try:
            ignored = [model.get_submodule(name) for name in params.get("ignore", [])]
        except AttributeError as exc:
            raise InvalidInputError(f"optimize step prune: ignore names no submodule: {exc}") from None
        # The last weighted layer makes the model's output: its channels are the output's shape.
        ignored.append(_weighted_layers(torch, model, steps.example)[-1])
        pruner = tp.pruner.MetaPruner(
            model, steps.example, importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=amount, ignored_layers=ignored,
        )  # fmt: skip
        pruner.step()
        if epochs:
            applied["finetune_loss"] = _fit(model, parent, steps, params, epochs, "prune")
    else:
        raise InvalidInputError(f"optimize step prune: method must be magnitude or channels, not {method!r}")
    steps.check_outputs(parent, model, "prune")
    applied.update(parameters_after=_parameters(model), finetune_epochs=epochs)
    return model, applied


def distill(parent: Any, params: dict[str, Any], steps: TorchSteps) -> tuple[Any, dict[str, Any]]:
    """Train a fresh `student` (module + init_args) on the parent's soft targets."""
    torch = require("torch", "torch", "distillation")
    check_params(params, {"student", "epochs", "lr", "batch_size", "temperature", "alpha", "seed"}, "distill")
    student_spec = params.get("student")
    if not isinstance(student_spec, dict) or not isinstance(student_spec.get("module"), str):
        raise InvalidInputError(
            "optimize step distill: student must be {module: 'package.module:Class', init_args: {...}}"
        )
    init_args = student_spec.get("init_args", {})
    torch.manual_seed(int(params.get("seed", 0)))
    try:
        student = import_object(student_spec["module"], steps.base_dir)(**init_args)
    except TypeError as exc:
        raise InvalidInputError(f"optimize step distill: cannot build the student: {exc}") from None
    if not isinstance(student, torch.nn.Module):
        raise InvalidInputError(f"optimize step distill: {student_spec['module']} is not a torch.nn.Module")
    epochs = int(params.get("epochs", 10))
    loss = _fit(student, parent, steps, params, epochs, "distill")
    steps.check_outputs(parent, student, "distill")
    return student, {
        "student": {"module": student_spec["module"], "init_args": init_args},
        "epochs": epochs,
        "loss": loss,
        "parameters_before": _parameters(parent),
        "parameters_after": _parameters(student),
    }


_STEPS = {"prune": prune, "distill": distill}


class TorchSteps:
    """Runs one search's PyTorch steps and keeps each candidate's module, so later steps build on it."""

    def __init__(
        self,
        source: TorchSource,
        signature: SignatureSpec,
        convert: ConvertSpec,
        training: Training,
        sample: dict[str, np.ndarray],
        base_dir: Path,
    ) -> None:
        torch = require("torch", "torch", "pruning and distillation")
        if isinstance(source.module, torch.jit.ScriptModule):
            raise InvalidInputError("prune and distill need a Python module (module + weights, or torch.export), "
                                    "not TorchScript")  # fmt: skip
        self.signature, self.convert, self.training, self.base_dir = signature, convert, training, base_dir
        self.example = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in sample.values())
        self._modules: dict[int | None, Any] = {None: source.module}
        self.on_epoch: Callable[[float], None] = lambda done: None
        """Called with the fraction of training done after each epoch (the search moves its progress bar)."""

    def check_outputs(self, parent: Any, model: Any, step: str) -> None:
        torch = require("torch", "torch", "pruning and distillation")
        with torch.no_grad():
            before, after = parent(*self.example), model(*self.example)
        shapes = [tuple(o.shape) for o in (before if isinstance(before, (tuple, list)) else [before])]
        new = [tuple(o.shape) for o in (after if isinstance(after, (tuple, list)) else [after])]
        if shapes != new:
            raise InvalidInputError(f"optimize step {step}: the model's outputs changed shape {shapes} -> {new}")

    def apply(self, step: str, params: dict[str, Any], parent: int | None, trial: int, dest: Path) -> dict[str, Any]:
        """Run `step` on trial `parent`'s module (None: the source model) and export the result to `dest`."""
        if parent not in self._modules:
            raise InvalidInputError(f"optimize step {step} needs a PyTorch parent: list it before the ONNX steps")
        model, applied = _STEPS[step](self._modules[parent], params, self)
        scratch = dest.with_suffix(".export")  # the exporter may write weights to side files
        scratch.mkdir()
        source = TorchSource(model, f"optimize:{step}")
        exported = source.export_onnx(scratch / MODEL_FILE, self.signature, self.convert)
        place_model(exported.path, check_onnx(exported.path), dest)
        self._modules[trial] = model
        return {**applied, "exporter": exported.params["exporter"]}
