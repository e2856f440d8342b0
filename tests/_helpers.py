"""Helpers shared by tests: small models built in the test, specs, publishing."""

from __future__ import annotations

import itertools
import secrets
import socket
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import yaml
from onnx import TensorProto, helper, numpy_helper

from shipyard.artifact import create_manifest
from shipyard.registry import LocalRegistry
from shipyard.spec.models import SignatureSpec, TensorSpec

SIGNATURE = SignatureSpec(inputs=[TensorSpec(name="x", dtype="float32", shape=["batch", 2])])


def make_mlp_onnx(path: Path, seed: int = 0, sizes: tuple[int, ...] = (16, 8, 4), outlier: float = 0.0) -> Path:
    """A MatMul-ReLU-...-MatMul classifier with a dynamic batch dimension, built with onnx.helper.

    `outlier` plants one huge weight in the first layer, so per-tensor INT8 quantization loses the others.
    """
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        if outlier and i == 0:
            w[0, 0] = outlier
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        last = i == len(sizes) - 2
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], ["logits" if last else f"m{i}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"]))
            current = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", sizes[-1]])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_spec(folder: Path, spec: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "shipyard.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _ephemeral_ports() -> range:
    try:
        low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


_EPHEMERAL = _ephemeral_ports()
_PORTS = itertools.cycle(p for p in range(20000, 32768) if p not in _EPHEMERAL)
for _ in range(secrets.randbelow(12000)):  # runs side by side on one machine start at different places
    next(_PORTS)


def free_port() -> int:
    """A loopback port no one listens on, for a server a test starts. It comes from below the kernel's
    ephemeral range, so between this check and the server's bind no outgoing connection or bind(0) can be
    given it (a port taken from bind(0) and released could be), and each is handed out once per cycle."""
    for port in _PORTS:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("unreachable: the cycle never ends")


def publish(registry: LocalRegistry, name: str = "m", payload: bytes = b"model") -> int:
    with registry.stage() as staged:
        (staged / "model.onnx").write_bytes(payload)
        create_manifest(staged, name=name, model_file="model.onnx", signature=SIGNATURE)
        manifest = registry.publish(staged)
    assert manifest.version is not None
    return manifest.version


ONNX_TYPES = {
    "BOOL": TensorProto.BOOL, "UINT8": TensorProto.UINT8, "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32, "UINT64": TensorProto.UINT64, "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16, "INT32": TensorProto.INT32, "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16, "FP32": TensorProto.FLOAT, "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}  # fmt: skip


def make_identity_onnx(path: Path, datatype: str, width: int = 3) -> Path:
    """y = Identity(x) for one V2 datatype, shape [batch, width]: exercises every datatype end to end."""
    elem = ONNX_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("x", elem, ["batch", width])],
        [helper.make_tensor_value_info("y", elem, ["batch", width])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def sample_data(datatype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Values that exercise the datatype's range (negative numbers, large unsigned, non-ASCII text)."""
    rng = np.random.default_rng(seed)
    count = int(np.prod(shape))
    if datatype == "BYTES":
        words = [f"wörd-{i}".encode() if i % 2 else f"\x00bin ✓ {i}".encode() for i in range(count)]
        return np.array(words, dtype=np.object_).reshape(shape)
    if datatype == "BOOL":
        return rng.random(shape) > 0.5
    from shipyard.dtypes import BY_V2

    dtype = BY_V2[datatype].numpy
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 100).astype(dtype)


def make_slow_onnx(path: Path, width: int = 1024, layers: int = 16) -> Path:
    """A chain of width x width MatMuls: tens of milliseconds per batch, to keep requests in flight."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "w")
    names = ["x", *[f"h{i}" for i in range(layers - 1)], "y"]
    nodes = [helper.make_node("MatMul", [a, "w"], [b]) for a, b in itertools.pairwise(names)]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def build_evaluated_mlp(folder: Path, registry: LocalRegistry, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Build an MLP whose evaluation labels are its own predictions (accuracy 1.0 at build); returns (x, labels)."""
    from shipyard.pipeline import build
    from shipyard.spec import load_spec

    model = make_mlp_onnx(folder / "mlp.onnx")
    x = np.random.default_rng(0).standard_normal((samples, 16)).astype(np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    labels = session.run(None, {"x": x})[0].argmax(1)
    np.savez(folder / "eval.npz", x=x, y=labels)
    spec = {"name": "mlp", "model": {"format": "onnx", "path": "mlp.onnx"},
            "evaluation": {"dataset": {"kind": "npz", "path": "eval.npz"}, "metric": "accuracy",
                           "latency": {"iterations": 10}}}  # fmt: skip
    build(load_spec(write_spec(folder, spec)), registry)
    return x, labels


WORDS = [
    "<eos>",
    "<unk>",
    "the",
    "ship",
    "sails",
    "north",
    "south",
    "at",
    "dawn",
    "dusk",
    "with",
    "crew",
    "salt",
    "system",
    "user",
    "assistant",
    ":",
    ";",
    "wind",
    "sea",
    "port",
    "harbour",
    "storm",
    "calm",
    "sky",
    "rain",
]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ; {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")  # fmt: skip
ARCHITECTURES = ("llama", "qwen2", "phi3", "mistral")


def _byte_level_tokenizer() -> Any:
    """A byte-level BPE (as GPT-2, Llama 3 and Qwen use) of about 300 tokens, trained here: it can write any
    text, JSON included, which structured output needs. `<eos>` is id 0, `<unk>` id 1, then StarCoder's
    fill-in-the-middle tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<eos>", "<unk>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"]  # with fill-in-the-middle tokens
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    text = [" ".join(WORDS[2:]), '{"name": "ark", "speed": 12, "ok": true}', "user : north wind ; assistant :"]
    tokenizer.train_from_iterator(text * 20, trainer)
    return tokenizer


def make_hf_causal(
    folder: Path,
    architecture: str = "llama",
    context: int = 128,
    bos: bool = False,
    byte_level: bool = False,
    head_scale: float = 1.0,
) -> Path:
    """A random-initialised causal LM of `architecture` (tiny dims) saved with save_pretrained, with a
    word-level tokenizer over WORDS (so every token decodes to whole words) and a chat template. Its `<eos>`
    row of the output layer is zero, so greedy decoding never ends early on a random draw. With `bos` the
    tokenizer puts its BOS (`<eos>`, id 0, as the config says) before every text, as Llama's does; with
    `byte_level` the tokenizer is a byte-level BPE that can write any text. `head_scale` multiplies the output
    layer: random weights give nearly flat logits, and a larger scale makes the model decide between tokens
    (its top token clearly ahead at most positions), as a trained one does."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()  # joins words with spaces
    if byte_level:
        tokenizer = _byte_level_tokenizer()
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", bos_token="<eos>",
                                                unk_token="<unk>", pad_token="<eos>")  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    names = {"llama": "Llama", "qwen2": "Qwen2", "phi3": "Phi3", "mistral": "Mistral"}[architecture]
    config = getattr(transformers, f"{names}Config")(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context, bos_token_id=0,
        eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
        # Phi-3 "mini 4k" keeps both at its context; a difference makes the builder expect LongRoPE factors.
        **({"original_max_position_embeddings": context} if architecture == "phi3" else {}),
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, f"{names}ForCausalLM")(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(head_scale)
        model.get_output_embeddings().weight[0].zero_()
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def causal_spec(name: str = "lm", **generation: Any) -> dict[str, Any]:
    """The spec that builds the folder `hf` next to it as a language model."""
    return {"name": name, "model": {"format": "huggingface", "path": "hf", "task": "text-generation",
                                    "generation": {"max_new_tokens": 24, **generation}}}  # fmt: skip


def make_loop_onnx(path: Path) -> Path:
    """A model whose cost is set by a value it is sent: an ONNX Loop that runs `n` times over x [1, 4] (each
    turn y = y * 1). Fast at warm-up, as slow as a client likes afterwards."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Mul", ["y_in", "one"], ["y_out"])],
        "turn",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_in", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_out", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(np.ones((), np.float32), "one")],
    )  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Squeeze", ["n"], ["trips"]), helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body)],
        "loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("n", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


# Chat templates that show tools, as Qwen's and Llama 3's do (shortened): calls in <tool_call> tags, or a bare
# JSON object with "parameters".
QWEN_STYLE = """{%- if tools %}<|im_start|>system
You may call these tools:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Reply with <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LLAMA3_STYLE = """{%- if tools %}<|start_header_id|>system<|end_header_id|>
Environment: ipython
Respond with a JSON for a function call: {"name": function name, "parameters": dictionary of arguments}.
{%- for t in tools %}
{{ t | tojson(indent=4) }}
{%- endfor %}<|eot_id|>
{%- endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|start_header_id|>assistant<|end_header_id|>
{%- for call in message.tool_calls %}{"name": "{{ call.function.name }}", "parameters": \
{{ call.function.arguments | tojson }}}{%- endfor %}<|eot_id|>
{%- elif message.role == "tool" %}<|start_header_id|>ipython<|end_header_id|>
{{ message.content }}<|eot_id|>
{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>
{{ message.content }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>
{% endif %}"""


def make_gguf(folder: Path, dest: Path) -> Path:
    """The Llama in a `save_pretrained` folder (with a byte-level BPE) written as a float32 GGUF file the way
    llama.cpp's converter lays it out: its tensor names, query and key rows permuted for its rotary layout,
    the tokenizer as a gpt2-type vocabulary with merges, and the chat template in the metadata."""
    import json

    import gguf
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(dest), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = tokenizer["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    specials = {t["id"] for t in tokenizer["added_tokens"] if t.get("special")}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])  # fmt: skip
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_unk_token_id(vocab["<unk>"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_chat_template((folder / "chat_template.jinja").read_text())

    def permute(x: np.ndarray, n: int) -> np.ndarray:
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
    for layer in range(config["num_hidden_layers"]):
        names.update({f"model.layers.{layer}.{hf}.weight": f"blk.{layer}.{ours}.weight" for hf, ours in parts.items()})
    for hf, ours in names.items():
        tensor = weights[hf].astype(np.float32)
        if ours.endswith("attn_q.weight"):
            tensor = permute(tensor, heads)
        elif ours.endswith("attn_k.weight"):
            tensor = permute(tensor, kv_heads)
        writer.add_tensor(ours, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest
