"""Pruned and distilled variants of a CNN trained here, through `shipyard build`'s guarded search.

Run:  .venv/bin/python bench/compress_bench.py

The teacher is the demo's DigitsCNN made wider (32/64 channels, 128 hidden units) and trained on the
training part of scikit-learn's digits. Four builds share it: no optimization; channel pruning (half
the channels, fine-tuned on the teacher's outputs); distillation into a student with a quarter of the channels; and the
full chain prune -> distill -> static INT8, where each step must keep accuracy within 2 points (95 %
bootstrap bound) and be faster at batch 64 to be kept. Each registered model is then timed in-process
(ONNX Runtime, 1 thread): batch-1 p50/p99 and batch-64 throughput.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "src" / "shipyard" / "examples" / "digits"
sys.path.insert(0, str(HERE))
from _timing import time_runs  # noqa: E402

from shipyard.onnxrt import session  # noqa: E402

SPLIT = {"kind": "sklearn", "name": "digits", "test_size": 0.25, "seed": 0}
TEACHER = {"channels": 32, "hidden": 128}
PRUNE = {"step": "prune", "params": {"method": "channels", "amount": 0.5, "finetune_epochs": 20}}
STUDENT = {"module": "model:DigitsCNN", "init_args": {"channels": 8, "hidden": 32}}
DISTILL = {"step": "distill", "params": {"student": STUDENT, "epochs": 80}}
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "teacher (FP32)": [],
    "pruned 50 % channels": [PRUNE],
    "distilled into an 8/16-channel CNN": [DISTILL],
    "search: prune -> distill -> INT8": [PRUNE, DISTILL, {"step": "quantize_static"}],
}


def train_teacher(folder: Path, epochs: int = 40) -> None:
    import torch
    from safetensors.torch import save_file

    from shipyard.pipeline.datasets import sklearn_split
    from shipyard.spec.models import SklearnDatasetSpec

    sys.path.insert(0, str(folder))
    from model import DigitsCNN

    x, _, y, _ = sklearn_split(SklearnDatasetSpec.model_validate(SPLIT))
    inputs, labels = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8), torch.tensor(y)
    torch.manual_seed(0)
    model = DigitsCNN(**TEACHER)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        order = torch.randperm(len(inputs))
        for i in range(0, len(inputs), 64):
            batch = order[i : i + 64]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
            optimizer.step()
    save_file(model.state_dict(), str(folder / "weights.safetensors"))


def spec(name: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "model": {"format": "torch", "module": "model:DigitsCNN", "init_args": TEACHER,
                  "weights": "weights.safetensors",
                  "signature": {"inputs": [{"name": "pixels", "dtype": "float32", "shape": ["batch", 1, 8, 8]}],
                                "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]}},
        "evaluation": {"dataset": {**SPLIT, "split": "test"}, "metric": "accuracy",
                       "latency": {"iterations": 200, "threads": 1}},
    }  # fmt: skip
    if steps:
        out["optimize"] = {"steps": steps, "train_data": {**SPLIT, "split": "train"}, "max_drop": 0.02,
                           "speed_batch": 64}  # fmt: skip
    return out


def main() -> None:
    from shipyard.registry import LocalRegistry

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copy(EXAMPLE / "model.py", work / "model.py")
        train_teacher(work)
        registry = work / "registry"
        pixels = np.random.default_rng(0).integers(0, 17, (64, 1, 8, 8)).astype(np.float32)
        for index, (label, steps) in enumerate(VARIANTS.items()):
            name = f"variant{index}"
            (work / "shipyard.yaml").write_text(yaml.safe_dump(spec(name, steps)))
            command = [sys.executable, "-m", "shipyard", "build", str(work), "--registry", str(registry)]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            manifest = LocalRegistry(registry).manifest(f"{name}:1")
            path = registry / "models" / name / "1" / "model.onnx"
            sess = session(path)
            one, many = time_runs(sess, {"pixels": pixels[:1]}, 3.0), time_runs(sess, {"pixels": pixels}, 3.0)
            applied = [s["step"] for s in manifest.lineage[-1].params.get("applied", [])] if steps else []
            rows.append((label, " -> ".join(applied) or "-", manifest.metrics["parameters"], path.stat().st_size,
                         manifest.metrics["accuracy"], one, many))  # fmt: skip
    print("\n| variant | steps kept | parameters | size (KiB) | accuracy | p50 b1 (ms) | p99 b1 (ms) | samples/s b64 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, applied, params, size, accuracy, one, many in rows:
        print(f"| {label} | {applied} | {params:,.0f} | {size / 1024:.1f} | {accuracy:.4f} | {one['p50_ms']:.3f} "
              f"| {one['p99_ms']:.3f} | {many['per_s']:,.0f} |")  # fmt: skip
    teacher, best = rows[0], rows[-1]
    speed = best[6]["per_s"] / teacher[6]["per_s"]
    latency = teacher[5]["p50_ms"] / best[5]["p50_ms"]
    print(f"\nsearch result vs teacher: {teacher[3] / best[3]:.1f}x smaller, {speed:.2f}x batch-64 throughput, "
          f"{latency:.2f}x batch-1 p50, accuracy {best[4] - teacher[4]:+.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
