"""Hugging Face model folders (the `save_pretrained` layout): checks, loading in PyTorch, export to ONNX.

Nothing here reaches for a hub: HF_HUB_OFFLINE is set before transformers is imported and every load is
local_files_only. Weights must be safetensors unless the spec trusts pickles, and a config that names its
own code (auto_map) is refused unless the spec trusts remote code.

Causal language models are exported with ONNX Runtime GenAI's model builder: its graphs use
GroupQueryAttention with a key/value cache that is read and written in place (what continuous batching
needs) and it supports the common decoder architectures (Llama, Mistral, Qwen, Phi, Gemma, ...).
Optimum's exporter would be the other choice; optimum-onnx 0.1.0 requires transformers < 4.58, older than
the transformers this project runs, and its graphs concatenate the cache at every step.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipyard.artifact.manifest import GenerationRecord
from shipyard.chat_template import compile_template
from shipyard.errors import ConversionError, MissingExtraError, ModelLoadError, UnsafeModelError
from shipyard.settings import HUB_OFFLINE, child_environment, hub_offline
from shipyard.spec.models import GenerationSpec, ModelSourceSpec, SignatureSpec, TensorSpec, TokenizerSpec, resolve_path
from shipyard.tokenizer import load_tokenizer

PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class HfFolder:
    """A checked model folder: its config and the files a build reads."""

    path: Path
    config: dict[str, Any]
    task: str
    trust_pickle: bool

    @property
    def tokenizer_file(self) -> Path:
        return self.path / TOKENIZER_FILE

    def json(self, name: str) -> dict[str, Any]:
        """A JSON file of the folder, {} when absent."""
        file = self.path / name
        if not file.is_file():
            return {}
        try:
            loaded = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{file}: not valid JSON ({exc})") from None
        return loaded if isinstance(loaded, dict) else {}

    def chat_template(self) -> str | None:
        """The Jinja chat template: chat_template.jinja (newer transformers) or tokenizer_config.json's."""
        file = self.path / "chat_template.jinja"
        if file.is_file():
            return file.read_text(encoding="utf-8")
        template = self.json("tokenizer_config.json").get("chat_template")
        return template if isinstance(template, str) else None

    def special_tokens(self) -> dict[str, str]:
        """bos_token / eos_token as chat templates name them."""
        config = self.json("tokenizer_config.json")
        tokens = {}
        for name in ("bos_token", "eos_token"):
            value = config.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                tokens[name] = value
        return tokens

    def sampling_defaults(self) -> dict[str, float]:
        """What transformers' generate() would do with this folder's generation_config.json: greedy unless it
        says do_sample (then its temperature, top_p, top_k, min_p; transformers' top_k 50 when unset), and its
        repetition_penalty either way. No file: nothing (OpenAI's defaults apply)."""
        config = self.json("generation_config.json")
        if not config:
            return {}
        numbers = {name: float(value) for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                   if isinstance(value := config.get(name), int | float) and not isinstance(value, bool)}  # fmt: skip
        chosen = {k: v for k, v in numbers.items() if k == "repetition_penalty" and v != 1.0}
        if config.get("do_sample") is not True:
            return {**chosen, "temperature": 0.0}
        return {"top_k": 50.0, **numbers}

    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids from generation_config.json, else config.json."""
        for source in (self.json("generation_config.json"), self.config):
            value = source.get("eos_token_id")
            ids = value if isinstance(value, list) else [value]
            found = [i for i in ids if isinstance(i, int)]
            if found:
                return found
        return []


def read_folder(source: ModelSourceSpec, base_dir: Path) -> HfFolder:
    """Check a folder before anything in it is parsed by a library that could run code."""
    assert source.path is not None
    assert source.task is not None
    path = resolve_path(base_dir, source.path).resolve()
    if not path.is_dir():
        raise ModelLoadError(f"model.path: no such folder: {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a Hugging Face model folder (no config.json; save_pretrained writes one)")
    folder = HfFolder(path, {}, source.task, source.trust_pickle)
    config = folder.json("config.json")
    if not config.get("model_type"):
        raise ModelLoadError(f"{path / 'config.json'}: no model_type: cannot tell the architecture")
    if "auto_map" in config and not source.trust_remote_code:
        raise UnsafeModelError(
            f"{path}: its config names its own Python code (auto_map), which would run at build time; set "
            "model.trust_remote_code: true only for folders you trust"
        )
    if not any(path.glob("*.safetensors")):
        pickled = [name for name in PICKLED_WEIGHTS if (path / name).exists()]
        if not pickled:
            raise ModelLoadError(f"{path}: no weights (model.safetensors, or sharded *.safetensors)")
        if not source.trust_pickle:
            raise UnsafeModelError(
                f"{path}: the weights are {pickled[0]}, a pickle that can run code when loaded; convert them to "
                "safetensors, or set model.trust_pickle: true for files you produced yourself"
            )
    if not folder.json(TOKENIZER_FILE).get("model"):
        raise ModelLoadError(f"{path}: no {TOKENIZER_FILE} (a fast tokenizer, which the server runs without torch)")
    checked = HfFolder(path, config, source.task, source.trust_pickle)
    _check_tokenizer(checked)
    template = checked.chat_template()
    if template is not None:
        compile_template(template, str(path))
    return checked


def _check_tokenizer(folder: HfFolder) -> None:
    """ModelLoadError when the tokenizer has ids the model's embedding table does not: a prompt holding one
    would fail the graph (and, batched, every sequence beside it)."""
    vocabulary = folder.config.get("vocab_size")
    if not isinstance(vocabulary, int):
        return
    ids = load_tokenizer(folder.tokenizer_file).get_vocab(with_added_tokens=True)
    outside = sorted((i, token) for token, i in ids.items() if i >= vocabulary)
    if outside:
        shown = ", ".join(f"{token!r} = {i}" for i, token in outside[:3])
        raise ModelLoadError(
            f"{folder.tokenizer_file}: {len(outside)} token(s) have ids outside the model's vocabulary of "
            f"{vocabulary} (config.json vocab_size): {shown}{', ...' if len(outside) > 3 else ''}"
        )


def weights_hash(folder: Path) -> str:
    """One sha256 over the folder's weight files (the build's source hash)."""
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")):
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def load_torch_model(folder: HfFolder, trust_remote_code: bool = False) -> Any:
    """The folder's model in PyTorch, in eval mode (for verification and the unoptimized reference)."""
    hub_offline()
    try:
        import transformers
    except ImportError:
        raise MissingExtraError("Hugging Face folders need transformers: pip install 'shipyard[hf]'") from None
    classes = {
        "text-generation": transformers.AutoModelForCausalLM,
        "feature-extraction": transformers.AutoModel,
        "text-classification": transformers.AutoModelForSequenceClassification,
    }
    try:
        model = classes[folder.task].from_pretrained(
            str(folder.path), local_files_only=True, trust_remote_code=trust_remote_code,
            use_safetensors=not folder.trust_pickle or None, dtype="float32",
        )  # fmt: skip
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{folder.path}: transformers cannot load it as {folder.task}: {exc}") from None
    return model.eval()


def export_decoder(folder: HfFolder, dest: Path, precision: str = "fp32") -> Path:
    """The causal LM as ONNX Runtime GenAI's decoder graph in `dest` (model.onnx + model.onnx.data)."""
    try:
        import onnxruntime_genai  # noqa: F401  (only to say which extra is missing)
    except ImportError:
        raise MissingExtraError(
            "exporting language models needs onnxruntime-genai: pip install 'shipyard[hf]'"
        ) from None
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder.path), "-o", str(dest),
               "-p", precision, "-e", "cpu", "-c", str(dest / ".cache")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=child_environment(HUB_OFFLINE), check=False)
    if done.returncode != 0 or not (dest / "model.onnx").is_file():
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        reason = next(
            (line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else ""
        )
        raise ConversionError(f"ONNX Runtime GenAI's model builder could not export {folder.path}: {reason.strip()}")
    return dest / "model.onnx"


def builder_layout(dest: Path) -> dict[str, Any]:
    """The decoder's layout as the builder wrote it in genai_config.json."""
    config = json.loads((dest / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    return {
        "layers": decoder["num_hidden_layers"], "kv_heads": decoder["num_key_value_heads"],
        "head_size": decoder["head_size"], "context": config["model"]["context_length"],
        "past_key": decoder["inputs"]["past_key_names"], "past_value": decoder["inputs"]["past_value_names"],
        "present_key": decoder["outputs"]["present_key_names"],
        "present_value": decoder["outputs"]["present_value_names"],
    }  # fmt: skip


def _pooling(folder: HfFolder) -> tuple[str, bool]:
    """How a sentence-transformers folder pools token vectors (mean, cls or max) and whether it normalizes;
    mean without normalizing for a plain transformers folder."""
    modules = folder.path / "modules.json"
    normalize, mode = False, "mean"
    if modules.is_file():
        entries = json.loads(modules.read_text())
        normalize = any(str(e.get("type", "")).endswith("Normalize") for e in entries if isinstance(e, dict))
        for entry in entries:
            if isinstance(entry, dict) and str(entry.get("type", "")).endswith("Pooling"):
                config = folder.json(f"{entry.get('path', '1_Pooling')}/config.json")
                for name in ("cls", "max", "mean"):
                    if config.get(f"pooling_mode_{name}_token" if name == "cls" else f"pooling_mode_{name}_tokens"):
                        mode = name
    return mode, normalize


def encoder_source(folder: HfFolder, trust_remote_code: bool) -> tuple[Any, SignatureSpec]:
    """A feature-extraction (pooled sentence embedding) or text-classification model as a PyTorch module
    taking token ids, and its signature; the generic convert step exports it with torch.onnx."""
    import torch

    from shipyard.pipeline._torch import TorchSource

    model = load_torch_model(folder, trust_remote_code)
    feeds = ["input_ids", "attention_mask"]
    if int(folder.config.get("type_vocab_size", 0)) > 0:
        feeds.append("token_type_ids")
    if folder.task == "text-classification":
        labels = int(getattr(model.config, "num_labels", 2))
        output = TensorSpec(name="logits", dtype="float32", shape=["batch", labels])
    else:
        output = TensorSpec(name="embedding", dtype="float32", shape=["batch", int(folder.config["hidden_size"])])
    mode, normalize = _pooling(folder)

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: Any) -> Any:
            named = dict(zip(feeds, inputs, strict=True))
            out = self.model(**named)
            if folder.task == "text-classification":
                return out.logits
            hidden, mask = out.last_hidden_state, named["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
            if mode == "cls":
                pooled = hidden[:, 0]
            elif mode == "max":
                pooled = (hidden - (1 - mask) * 1e9).max(dim=1).values
            else:
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled

    signature = SignatureSpec(
        inputs=[TensorSpec(name=n, dtype="int64", shape=["batch", "sequence"]) for n in feeds], outputs=[output]
    )
    return TorchSource(Encoder().eval(), "huggingface"), signature


def tokenizer_spec(folder: HfFolder) -> TokenizerSpec:
    """The folder's tokenizer in front of the graph, truncating at the model's positions (512 at most)."""
    length = int(folder.config.get("max_position_embeddings", 512))
    return TokenizerSpec(path=str(folder.tokenizer_file), input="text", max_length=min(length, 512))


def generation_record(folder: HfFolder, layout: dict[str, Any], spec: GenerationSpec, cache_bytes_per_slot: int
            ) -> GenerationRecord:  # fmt: skip
    """What the server needs to generate: the tokenizer, context, cache layout and slots, end tokens, chat
    template and sampling defaults (the folder's, under the spec's)."""
    context = min(layout.pop("context"), spec.context or 1 << 30)
    slots = spec.max_running
    if spec.kv_cache_mb is not None:
        per_slot = cache_bytes_per_slot * context / 2**20
        slots = max(1, min(slots, int(spec.kv_cache_mb // per_slot)))
    sampling = {**folder.sampling_defaults(), **(spec.sampling.model_dump(exclude_none=True) if spec.sampling else {})}
    return GenerationRecord(
        tokenizer_file="tokenizer.json", max_new_tokens=spec.max_new_tokens, context=context,
        eos_token_ids=folder.eos_token_ids(), chat_template=folder.chat_template(),
        special_tokens=folder.special_tokens(), prefix_cache=spec.prefix_cache, max_running=slots, sampling=sampling,
        max_waiting=spec.max_waiting, prefill_chunk=spec.prefill_chunk, prefill_pace=spec.prefill_pace, **layout,
    )  # fmt: skip
