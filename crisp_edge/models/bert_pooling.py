"""A BERT sequence classifier on the mean of the token states: how sentence-embedding encoders
(sentence-transformers' all-MiniLM-L6-v2 and its kin) are meant to be read.

``BertForSequenceClassification`` classifies the [CLS] *pooler* output (``tanh(dense(h_cls))``). In
all-MiniLM-L6-v2 that pooler is left over from MiniLM's pre-training: the sentence-embedding training
only ever used the attention-masked mean of the last hidden states (the folder's
``1_Pooling/config.json``: ``pooling_mode_mean_tokens``), so the [CLS] pooler is not the model's
embedding, and a head on it starts from a worse feature. ``MeanPoolBertForSequenceClassification``
keeps every module of ``BertForSequenceClassification`` (same parameter names, so checkpoints, the
architecture table entry ``hf-bert`` and LoRA targets are shared) but drops the unused pooler and
classifies ``dropout(mean_pool(last_hidden_state, attention_mask))``.

This module imports only torch and transformers, so ``crisp_edge.models.sources`` can rebuild the class
from a checkpoint's recorded source (``HF_EXTRA_CLASSES``).
"""
from __future__ import annotations

import torch
import transformers
from transformers.modeling_outputs import SequenceClassifierOutput


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean over tokens of ``hidden`` (batch, tokens, width), counting only unmasked tokens
    (a row with no token left gives zeros, not NaN)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class MeanPoolBertForSequenceClassification(transformers.BertForSequenceClassification):
    """``BertForSequenceClassification`` with mean pooling instead of the [CLS] pooler (module docstring).

    Returns a ``SequenceClassifierOutput`` whose ``logits`` are (batch, num_labels); ``labels``
    (optional) give the cross-entropy ``loss``.
    """

    #: The pooler weights a sentence-transformers folder still carries are not loaded (not used).
    _keys_to_ignore_on_load_unexpected = [r"pooler\."]

    def __init__(self, config: transformers.BertConfig) -> None:
        super().__init__(config)
        self.bert.pooler = None  # unused: the feature is the mean of the token states

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The sentence embedding before the head (not normalised; sentence-transformers L2-normalises it)."""
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return mean_pool(out.last_hidden_state, attention_mask)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **_: object) -> SequenceClassifierOutput:
        logits = self.classifier(self.dropout(self.embed(input_ids, attention_mask, token_type_ids)))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


#: Model classes crisp-edge adds to Hugging Face's, by class name (for rebuilding recorded sources).
HF_EXTRA_CLASSES: dict[str, type] = {
    MeanPoolBertForSequenceClassification.__name__: MeanPoolBertForSequenceClassification,
}
