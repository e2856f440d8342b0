"""GGUF files (what llama.cpp, Ollama and LM Studio hold models in) as a source of causal language models.

The file is checked with the `gguf` package first (its magic, its header, every tensor inside the file), so
a damaged one is refused in one line before any library reads its weights. transformers then reads it
(model, tokenizer and chat template from its metadata) and dequantizes the weights to float32; the model
is saved as a plain `save_pretrained` folder and built like any Hugging Face folder: exported, verified,
judged by perplexity, and re-quantized only where the search's guard accepts it. The file's own quantization
is recorded; it is not kept as it is, since ONNX Runtime's kernels need their own block layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipyard.errors import MissingExtraError, ModelLoadError
from shipyard.settings import hub_offline

MAGIC = b"GGUF"


@dataclass(frozen=True)
class GgufInfo:
    """What the file says of itself."""

    architecture: str
    quantization: str  # llama.cpp's file type: F32, F16, Q8_0, Q4_K_M, ...
    tensors: int

    def record(self, path: Path) -> dict[str, Any]:
        return {"file": path.name, "architecture": self.architecture, "quantization": self.quantization,
                "tensors": self.tensors,
                "weights": "dequantized to float32; re-quantized only where the search's guard accepts it"}  # fmt: skip


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise MissingExtraError("GGUF files need the gguf package: pip install 'shipyard[hf]'") from None
    return gguf


def check_gguf(path: Path) -> GgufInfo:
    """ModelLoadError naming the file when it is not a whole GGUF file."""
    if not path.is_file():
        raise ModelLoadError(f"model.path: no such file: {path}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != MAGIC:
        raise ModelLoadError(f"{path}: not a GGUF file (it starts with {magic!r}, not {MAGIC!r})")
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader's struct, numpy and value errors for cut or garbled headers
        raise ModelLoadError(f"{path}: a damaged GGUF file (cut short, or its header is garbled): "
                             f"{type(exc).__name__}: {str(exc)[:200]}") from None  # fmt: skip
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} lies outside the file (it ends at byte {end}, "
                                 f"the file has {size})")  # fmt: skip

    def field(name: str) -> Any:
        found = reader.fields.get(name)
        return found.contents() if found is not None else None

    file_type = field("general.file_type")
    try:
        quantization = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        quantization = f"file type {file_type}" if file_type is not None else "unstated"
    return GgufInfo(str(field("general.architecture") or "unstated"), quantization, len(reader.tensors))


def gguf_folder(path: Path, dest: Path) -> Path:
    """The model in a GGUF file as a `save_pretrained` folder in `dest` (float32 weights, its tokenizer and chat
    template)."""
    hub_offline()
    try:
        import torch
        import transformers
    except ImportError:
        raise MissingExtraError("GGUF files need torch and transformers: pip install 'shipyard[hf]'") from None
    try:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                   dtype=torch.float32)  # fmt: skip
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # transformers' own errors: an architecture or tokenizer it does not read
        raise ModelLoadError(f"{path}: transformers cannot read this GGUF model: {str(exc).splitlines()[0][:300]}"
                             ) from None  # fmt: skip
    # A model read from GGUF refuses save_pretrained (its config names the GGUF "quantization"): the same
    # weights go into a plain model of the same config, sharing their memory.
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = transformers.AutoConfig.for_model(settings.pop("model_type"), **settings)
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    _drop_invented_tokens(dest, int(config.vocab_size))
    return dest


def _drop_invented_tokens(folder: Path, vocabulary: int) -> None:
    """Remove the special tokens transformers adds to a GGUF vocabulary that lacks them (`<|endoftext|>` for
    gpt2-type ones): their ids lie past the model's embedding table, so a prompt holding one could not run."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    invented = {t["content"] for t in tokenizer.get("added_tokens", []) if t["id"] >= vocabulary}
    if not invented:
        return
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] not in invented]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    config["added_tokens_decoder"] = {k: v for k, v in config.get("added_tokens_decoder", {}).items()
                                      if int(k) < vocabulary}  # fmt: skip
    for key, value in list(config.items()):
        if isinstance(value, str) and value in invented:
            del config[key]
        elif isinstance(value, list) and key.endswith("special_tokens"):
            config[key] = [v for v in value if v not in invented]
    config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
