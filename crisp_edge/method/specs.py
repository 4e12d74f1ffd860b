"""Architecture knowledge, as a table: where the repeated blocks are and which linear layers
(roles) each block holds. Nothing else in crisp-edge branches on the architecture.

Add your own with ``register_architecture(ArchSpec(...))``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from crisp_edge.errors import UnknownArchitectureError


@dataclass(frozen=True)
class ArchSpec:
    """Where CRISP layers go in one architecture.

    Attributes:
        name: registry key, recorded in checkpoints.
        class_names: model classes this spec applies to (matched on the class and its bases).
        blocks: dotted path from the model to the ``nn.ModuleList`` of repeated blocks.
        roles: role name -> dotted path of an ``nn.Linear`` inside each block. Layers of one role
            can share a basis; the order here is the order groups are created in.
        head: dotted path of the task head (trained per task during adaptation), if any.
        trace_export: why crisp-edge's own exporters (a torch trace of the model) cannot export this
            architecture yet, or None when they can; the exporters refuse it with this reason.
    """

    name: str
    class_names: tuple[str, ...]
    blocks: str
    roles: Mapping[str, str]
    head: str | None = None
    description: str = ""
    trace_export: str | None = None


ARCHITECTURES: dict[str, ArchSpec] = {}


def register_architecture(spec: ArchSpec) -> ArchSpec:
    ARCHITECTURES[spec.name] = spec
    return spec


register_architecture(ArchSpec(
    name="timm-vit",
    class_names=("VisionTransformer",),
    blocks="blocks",
    roles={"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"},
    head="head",
    description="timm VisionTransformer of any size (vit_tiny ... vit_huge, any patch/image size)",
))
register_architecture(ArchSpec(
    name="hf-vit",
    class_names=("ViTForImageClassification",),
    blocks="vit.encoder.layer",
    roles={
        "query": "attention.attention.query", "key": "attention.attention.key",
        "value": "attention.attention.value", "attn_out": "attention.output.dense",
        "fc1": "intermediate.dense", "fc2": "output.dense",
    },
    head="classifier",
    description="Hugging Face ViTForImageClassification",
))
_BERT_ROLES = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attn_out": "attention.output.dense", "fc1": "intermediate.dense", "fc2": "output.dense",
}
register_architecture(ArchSpec(
    name="hf-bert",
    class_names=("BertForSequenceClassification",),
    blocks="bert.encoder.layer",
    roles=_BERT_ROLES,
    head="classifier",
    description="Hugging Face BertForSequenceClassification (BERT, MiniLM, all-MiniLM-L6-v2 with a head, ...)",
))
register_architecture(ArchSpec(
    name="hf-bert-encoder",
    class_names=("BertModel",),
    blocks="encoder.layer",
    roles=_BERT_ROLES,
    description="Hugging Face BertModel (the encoder alone: sentence embeddings, no task head)",
))
register_architecture(ArchSpec(
    name="hf-llama",
    class_names=("LlamaForCausalLM",),
    blocks="model.layers",
    roles={
        "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj",
    },
    head="lm_head",
    description="Hugging Face LlamaForCausalLM (LLaMA, SmolLM2, TinyLlama, ...)",
    trace_export="the traced graph fixes the example's batch size inside LLaMA's causal attention mask, so "
                 "it fails at any other batch; a plain LLaMA exports dense with export_onnx(..., exporter='optimum')",
))
register_architecture(ArchSpec(
    name="hf-llama-cls",
    class_names=("LlamaForTextClassification",),
    blocks="model.layers",
    roles=dict(ARCHITECTURES["hf-llama"].roles),
    head="score",
    description="a LLaMA text classifier: crisp_edge.models.llama_classifier.LlamaForTextClassification (a head "
                "on the last real token; its own causal mask keeps the batch axis dynamic, so it exports)",
))


def get_architecture(name: str) -> ArchSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UnknownArchitectureError(
            f"unknown architecture {name!r}; registered: {sorted(ARCHITECTURES)}. "
            "Register your own with crisp_edge.register_architecture(ArchSpec(...))."
        ) from None


def detect_architecture(model: nn.Module) -> ArchSpec:
    """The registered spec whose class names match ``model``'s class (or a base class)."""
    mro_names = [c.__name__ for c in type(model).__mro__]
    for spec in ARCHITECTURES.values():
        if any(n in spec.class_names for n in mro_names):
            return spec
    raise UnknownArchitectureError(
        f"crisp-edge has no architecture spec for {type(model).__name__}. Supported: "
        + ", ".join(f"{s.name} ({'/'.join(s.class_names)})" for s in ARCHITECTURES.values())
        + ". Pass arch=<name> if your class subclasses one of these under another name, or register "
        "an ArchSpec for it with crisp_edge.register_architecture."
    )


def resolve_blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The block list of ``model`` according to ``spec``, with a clear error if it is not there."""
    try:
        blocks = model.get_submodule(spec.blocks)
    except AttributeError:
        raise UnknownArchitectureError(
            f"{type(model).__name__} has no submodule {spec.blocks!r} that spec {spec.name!r} expects."
        ) from None
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise UnknownArchitectureError(f"{spec.blocks!r} in {type(model).__name__} is not a non-empty ModuleList or Sequential.")
    return blocks
