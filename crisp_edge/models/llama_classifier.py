"""Text classification with a LLaMA-architecture model: a class head on the last real token's state.

    lm = create_model("smollm2")                               # LlamaForCausalLM (GGUF, HF folder)
    model = as_text_classifier(lm, num_labels=4)                # LlamaForTextClassification
    logits = model(input_ids=ids, attention_mask=mask).logits   # (batch, 4)

On the command line: ``crisp-edge retrofit smollm2 --model-arg num_labels=4`` (or a LLaMA HF folder).

**Why a head, not scoring the label words.** Two designs are usual: (a) a linear head over the final
hidden state of the last real token (what ``LlamaForSequenceClassification`` does), or (b) asking the
LM head which label word is likeliest after a prompt. crisp-edge uses (a): the model's output is then
logits over the classes, exactly as for ViT and BERT, so adaptation (mixers + a per-task head), mixer
files, both exporters (dense / factored / swappable, with a head of any class count per task) and
parity work unchanged; (b) would tie every task to a prompt and to label names that are single tokens,
and would ship the whole vocabulary-sized LM head in every bundle.

**What differs from ``LlamaForSequenceClassification``** (the parameter names are the same: ``model.*``
and ``score.weight``, so its checkpoints load into this class):

* the last real token is found from ``attention_mask`` (the last position whose mask is 1), not by
  comparing ``input_ids`` with ``pad_token_id``: a text that contains the padding token (the end-of-text
  token, below) is still read to its end, and a mask is what the exported bundles take anyway;
* the attention mask handed to the decoder is built here as a 4-D additive mask (causal, padding keys
  masked, each position always sees itself so no row is empty) from plain tensor ops. Hugging Face's
  own mask builder bakes the example's batch size into a traced graph (``ArchSpec.trace_export`` of
  ``hf-llama``); this one keeps the batch axis dynamic, so crisp-edge's torch-trace exporters take it;
* eager attention (the kernels the exporters trace), and no key/value cache.

**Padding.** LLaMA tokenizers have no padding token; crisp-edge pads with the end-of-text (eos) token,
on the right (``tokenizers.text_tokenizer``). Which id pads does not change the output: padded positions
are masked out and never pooled.
"""
from __future__ import annotations

import torch
import transformers
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from crisp_edge.errors import ConfigError


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch,) index of the last position whose mask is 1 (0 for a row with none)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * (attention_mask != 0).to(positions.dtype)).argmax(-1)


def decoder_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, L, L) additive mask: 0 where query i may attend to key j (j <= i, and key j is a real
    token or j == i), the dtype's minimum elsewhere."""
    length = attention_mask.shape[-1]
    idx = torch.arange(length, device=attention_mask.device)
    causal = idx.unsqueeze(0) <= idx.unsqueeze(1)                        # (L, L): key j <= query i
    itself = idx.unsqueeze(0) == idx.unsqueeze(1)  # not torch.eye: ONNX EyeLike has no bool kernel in ORT
    allowed = causal & ((attention_mask != 0).unsqueeze(1) | itself)      # (batch, L, L)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, low).unsqueeze(1)


class LlamaForTextClassification(transformers.LlamaForSequenceClassification):
    """A LLaMA decoder with a class head on the last real token (see the module docstring).

    Returns a ``SequenceClassifierOutput`` with ``logits`` (batch, num_labels); ``labels`` give ``loss``.
    """

    def __init__(self, config: transformers.LlamaConfig) -> None:
        config._attn_implementation = "eager"  # the kernels the exporters trace; no SDPA/eager drift
        super().__init__(config)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **_: object) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.model.embed_tokens(input_ids)
        hidden = self.model(inputs_embeds=embeds, attention_mask=decoder_mask(attention_mask, embeds.dtype),
                            use_cache=False).last_hidden_state
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        logits = self.score(pooled)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def as_text_classifier(lm: nn.Module, num_labels: int, *, max_length: int | None = None,
                       pad_token_id: int | None = None, seed: int = 0) -> LlamaForTextClassification:
    """A ``LlamaForTextClassification`` with ``lm``'s decoder weights (a copy) and a new seeded head of
    ``num_labels`` classes, in eval mode. ``lm`` is a plain ``LlamaForCausalLM`` (its LM head is dropped).

    ``max_length``: tokens per example (texts are padded / truncated to it, and bundles take it),
    recorded in the config as ``max_text_length`` (``data.input_spec.input_spec_of`` reads it); default:
    the model's window, at most ``input_spec.DEFAULT_MAX_TEXT_LENGTH``. Short texts train and run much
    faster with a small one. ``pad_token_id`` is recorded in the config (default: the config's, else eos).
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ConfigError(f"num_labels must be an integer >= 2 (the classes of your task), got {num_labels!r}.")
    window = lm.config.max_position_embeddings
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or not 1 <= max_length <= window):
        raise ConfigError(f"max_length must be an integer in [1, {window}] (the model's window), got {max_length!r}.")
    if not isinstance(lm, transformers.LlamaForCausalLM):
        raise ConfigError(f"a text classifier is built from a plain LLaMA causal LM (LlamaForCausalLM: a .gguf, "
                          f"'smollm2' or a Hugging Face LLaMA folder), not a {type(lm).__name__}.")
    if any(n.startswith("crisp_") or ".crisp_" in n for n, _ in lm.named_parameters()):
        raise ConfigError("the model is already in CRISP form; build the classifier before retrofit_.")
    config = transformers.LlamaConfig.from_dict(lm.config.to_dict())
    config.num_labels = num_labels
    if max_length is not None:
        config.max_text_length = max_length
    config.architectures = [LlamaForTextClassification.__name__]
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    config.pad_token_id = pad_token_id if pad_token_id is not None else (
        config.pad_token_id if config.pad_token_id is not None else eos)
    dtype = next(lm.parameters()).dtype
    with torch.random.fork_rng(devices=[]):  # the head is seeded; the caller's RNG is untouched
        torch.manual_seed(seed)
        model = LlamaForTextClassification(config).to(dtype)
    model.model.load_state_dict(lm.model.state_dict())
    return model.eval()


#: Model classes this module adds to Hugging Face's, by class name (for rebuilding recorded sources).
LLAMA_EXTRA_CLASSES: dict[str, type] = {LlamaForTextClassification.__name__: LlamaForTextClassification}
