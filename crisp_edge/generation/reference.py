"""The PyTorch reference stepper: a Hugging Face causal LM (CRISP or not) decoding with its own
``DynamicCache``. Parity compares every runtime's steps against it."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from crisp_edge.errors import ConfigError
from crisp_edge.generation.loop import CachedStepper


class TorchStepper(CachedStepper):
    """Steps ``model`` (``LlamaForCausalLM``-like: ``model(input_ids=, past_key_values=, position_ids=,
    use_cache=True).logits``) in float32 eval mode, one sequence at a time.

    ``max_seq_len`` defaults to the model's ``max_position_embeddings``; pass the exported cache
    length to mirror a bundle exactly.
    """

    def __init__(self, model: nn.Module, max_seq_len: int | None = None) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        if config is None or not hasattr(model, "lm_head"):
            raise ConfigError(f"{type(model).__name__} is not a Hugging Face causal LM (no config / lm_head).")
        limit = int(getattr(config, "max_position_embeddings", 0) or 0)
        self.max_seq_len = int(max_seq_len or limit)
        if self.max_seq_len < 2:
            raise ConfigError(f"max_seq_len must be at least 2, got {self.max_seq_len}.")
        self.model = model.eval()
        self.vocab_size = int(config.vocab_size)
        self._cache = None

    def _clear(self) -> None:
        self._cache = None

    @torch.no_grad()
    def _run(self, ids: np.ndarray, start_pos: int) -> np.ndarray:
        from transformers import DynamicCache

        if self._cache is None:
            self._cache = DynamicCache()
        x = torch.from_numpy(ids).unsqueeze(0)
        pos = torch.arange(start_pos, start_pos + x.shape[1]).unsqueeze(0)
        out = self.model(input_ids=x, past_key_values=self._cache, position_ids=pos, cache_position=pos[0],
                         use_cache=True)
        self._cache = out.past_key_values
        return out.logits[0, -1].float().numpy()
