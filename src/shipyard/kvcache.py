"""The key/value cache of a language model, preallocated, and one run of its graph over it.

Per layer one array [slots, kv_heads, context, head_size] holds keys and one holds values. The graph (ONNX
Runtime GenAI's decoder layout, whose GroupQueryAttention reads each row's length from the attention mask)
reads the past from those arrays and writes the new positions into the same memory: past input and
present output are bound to one buffer, so a step never copies the cache. The server's scheduler and the
build's perplexity and decode-speed checks both run the graph through here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

from shipyard.artifact.manifest import GenerationRecord


class CacheSlots:
    """The preallocated key/value arrays and their binding to the graph's past and present tensors."""

    def __init__(self, record: GenerationRecord, slots: int, dtype: np.dtype[Any]) -> None:
        shape = (slots, record.kv_heads, record.context, record.head_size)
        self.names = [
            (pattern % layer, present % layer)
            for layer in range(record.layers)
            for pattern, present in ((record.past_key, record.present_key), (record.past_value, record.present_value))
        ]
        self.arrays = [np.zeros(shape, dtype=dtype) for _ in self.names]
        self.slots, self.context = slots, record.context
        self.nbytes = sum(a.nbytes for a in self.arrays)

    def bind(self, binding: ort.IOBinding, first: int, count: int) -> None:
        for (past, present), array in zip(self.names, self.arrays, strict=True):
            view = array[first : first + count]  # contiguous: the slot axis is the outermost
            shape, pointer = list(view.shape), view.ctypes.data
            binding.bind_input(past, "cpu", 0, array.dtype, shape, pointer)
            binding.bind_output(present, "cpu", 0, array.dtype, shape, pointer)

    def move(self, source: int, dest: int, length: int) -> None:
        for array in self.arrays:
            array[dest, :, :length] = array[source, :, :length]

    def save(self, slot: int, length: int) -> list[np.ndarray]:
        return [array[slot, :, :length].copy() for array in self.arrays]

    def restore(self, slot: int, saved: list[np.ndarray], length: int) -> None:
        """The first `length` positions of a saved cache into `slot` (a position depends only on the tokens
        up to it, so any leading part of a kept prompt's cache is the cache of that part)."""
        for array, part in zip(self.arrays, saved, strict=True):
            array[slot, :, :length] = part[:, :length]


class StepRunner:
    """Runs the graph on a contiguous range of slots: `ids` [count, width] new tokens, `totals` each row's
    length once they are in. Returns the logits of each row's last position [count, vocab], or of every
    new position [count, width, vocab]."""

    def __init__(self, session: ort.InferenceSession, cache: CacheSlots, ids_dtype: np.dtype[Any]) -> None:
        self.session, self.cache, self.ids_dtype = session, cache, ids_dtype

    def run(self, first: int, ids: np.ndarray, totals: list[int], every_position: bool = False) -> np.ndarray:
        count = len(totals)
        mask = np.zeros((count, max(totals)), dtype=np.int64)
        for row, total in enumerate(totals):
            mask[row, :total] = 1  # right-padded: each row's own length, read by the attention from the mask
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=self.ids_dtype))
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_output("logits", "cpu")
        self.cache.bind(binding, first, count)
        self.session.run_with_iobinding(binding)
        logits: np.ndarray = binding.get_outputs()[0].numpy()
        return logits if every_position else logits[:, -1]
