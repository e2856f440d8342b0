"""GGUF files as a source: a tiny random-initialised Llama written as llama.cpp lays GGUF out (the gguf
package's writer) goes through build, serve and the official openai client, its tokenizer and chat template
taken from the file; damaged files are refused in one line."""

from __future__ import annotations

import struct
from pathlib import Path

import openai
import pytest

from shipyard.errors import ModelLoadError
from shipyard.pipeline import build
from shipyard.registry import LocalRegistry
from shipyard.spec import load_spec
from tests._helpers import make_gguf, make_hf_causal, write_spec
from tests.serve.conftest import start_server, stop_server


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    folder = make_hf_causal(root / "hf", byte_level=True, context=512)
    return make_gguf(folder, root / "tiny.gguf")


def _spec(folder: Path, gguf: Path) -> Path:
    return write_spec(folder, {"name": "tiny", "model": {"format": "gguf", "path": str(gguf),
                                                         "generation": {"max_new_tokens": 16}}})  # fmt: skip


def test_a_gguf_file_builds_serves_and_answers_as_its_weights_do(gguf_file: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    registry = LocalRegistry(tmp_path / "registry")
    manifest = build(load_spec(_spec(tmp_path, gguf_file)), registry)
    load = next(step for step in manifest.lineage if step.step == "load").params
    assert load["format"] == "gguf"
    assert load["gguf"]["quantization"] == "F32"
    assert load["gguf"]["architecture"] == "llama"
    assert manifest.generation is not None
    assert manifest.generation.chat_template is not None  # from the file's metadata
    # The reference: transformers' greedy generate() on the original folder, with its own chat template.
    folder = gguf_file.parent / "hf"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "north wind"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = AutoModelForCausalLM.from_pretrained(folder).generate(**ids, max_new_tokens=8, do_sample=False)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    server = start_server(registry, tmp_path / "server.log", "tiny")
    try:
        with openai.OpenAI(base_url=f"{server.base()}/v1", api_key="none", max_retries=0) as client:
            reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8)  # type: ignore[arg-type]
        assert reply.choices[0].message.content == expected
    finally:
        assert stop_server(server) == 0


def _tensor_offset_position(data: bytes, name: str) -> int:
    """Where a tensor's data offset sits in the header: after its name, dimension count, dimensions and type."""
    at = data.index(name.encode()) + len(name)
    dims = struct.unpack_from("<I", data, at)[0]
    return at + 4 + 8 * dims + 4


@pytest.mark.parametrize("damage", ["truncated", "magic", "offset", "missing"])
def test_a_damaged_gguf_file_is_refused_in_one_line(gguf_file: Path, tmp_path: Path, damage: str) -> None:
    data = bytearray(gguf_file.read_bytes())
    bad = tmp_path / "bad.gguf"
    if damage == "truncated":
        bad.write_bytes(bytes(data[: len(data) // 2]))
        message = "lies outside the file|damaged GGUF file"
    elif damage == "magic":
        data[:4] = b"GGUX"
        bad.write_bytes(bytes(data))
        message = "not a GGUF file"
    elif damage == "offset":
        struct.pack_into("<Q", data, _tensor_offset_position(bytes(data), "output.weight"), 1 << 40)
        bad.write_bytes(bytes(data))
        message = "lies outside the file|damaged GGUF file"
    else:
        message = "no such file"
    registry = LocalRegistry(tmp_path / "registry")
    with pytest.raises(ModelLoadError, match=message) as raised:
        build(load_spec(_spec(tmp_path, bad)), registry)
    assert "\n" not in str(raised.value)
    assert registry.all_versions() == []
