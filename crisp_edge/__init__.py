"""crisp-edge: CRISP shared bases + tiny gated mixers, from PyTorch to edge runtimes.

The training side in one screen:

    import crisp_edge as ce
    model = ce.create_model("fmnist-vit")             # or any timm ViT / HF ViT / HF Llama
    report = ce.retrofit_(model, ce.CrispConfig())    # in place: linears -> shared bases + mixers
    print(report.format())                            # per-group errors and parameter budget
    ce.save_checkpoint(model, "ckpt/")                # safetensors + JSON, never pickle
    small, rep = ce.compress_vit(model, 0.5, x)       # Alg. 4 (ce.compress_llama_: Alg. 5)
    ce.adapt_(small, x_train, y_train, num_classes=10)   # Alg. 3: mixers (+ head) only
    ce.save_mixers(small, "task.safetensors", task="task")
    model = ce.load_checkpoint("ckpt/")
    ce.materialize_(model)                            # back to plain nn.Linear

The deploy side is ``crisp_edge.export``; how the package is laid out: docs/architecture.md.
"""
from crisp_edge._version import __version__  # noqa: F401  (crisp_edge.__version__)
from crisp_edge.errors import (
    CheckpointError,
    ConfigError,
    CrispEdgeError,
    DataError,
    RetrofitError,
    UnknownArchitectureError,
)
from crisp_edge.files.checkpoint import load_checkpoint, save_checkpoint
from crisp_edge.method.budget import Budget, budget
from crisp_edge.method.config import CrispConfig, RoleConfig
from crisp_edge.method.convert import (
    convert_,
    crisp_bases,
    crisp_layers,
    is_crisp,
    materialize_,
    plan_groups,
)
from crisp_edge.method.gates import GATES, PLACEMENTS
from crisp_edge.method.layer import CrispBasis, CrispLinear
from crisp_edge.method.specs import (
    ARCHITECTURES,
    ArchSpec,
    detect_architecture,
    register_architecture,
)
from crisp_edge.models.sources import build_model, create_model, load_embedded_vit
from crisp_edge.training.retrofit import RetrofitReport, retrofit_

#: Public names loaded on first use (training and data pull in more than the method needs).
_LAZY = {
    "adapt_": "crisp_edge.training.adapt", "AdaptConfig": "crisp_edge.training.adapt",
    "compress_vit": "crisp_edge.training.compress.vit", "compress_llama_": "crisp_edge.training.compress.llama",
    "run_pipeline": "crisp_edge.training.pipeline", "PipelineConfig": "crisp_edge.training.pipeline",
    "save_mixers": "crisp_edge.files.mixers", "read_mixers": "crisp_edge.files.mixers",
    "apply_mixers_": "crisp_edge.files.mixers", "TaskSwitcher": "crisp_edge.files.switcher",
    "load_task": "crisp_edge.data.tasks",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [*_LAZY,
    "ARCHITECTURES",
    "GATES",
    "PLACEMENTS",
    "ArchSpec",
    "Budget",
    "CheckpointError",
    "ConfigError",
    "CrispBasis",
    "CrispConfig",
    "CrispEdgeError",
    "CrispLinear",
    "DataError",
    "RetrofitError",
    "RetrofitReport",
    "RoleConfig",
    "UnknownArchitectureError",
    "budget",
    "build_model",
    "convert_",
    "create_model",
    "crisp_bases",
    "crisp_layers",
    "detect_architecture",
    "is_crisp",
    "load_checkpoint",
    "load_embedded_vit",
    "materialize_",
    "plan_groups",
    "register_architecture",
    "retrofit_",
    "save_checkpoint",
]
