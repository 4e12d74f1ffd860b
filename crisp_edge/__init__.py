"""crisp-edge: CRISP shared bases + tiny gated mixers, from PyTorch to edge runtimes.

The training side in one screen:

    import crisp_edge as ce
    model = ce.create_model("fmnist-vit")             # or any timm ViT / HF ViT / HF Llama
    report = ce.retrofit_(model, ce.CrispConfig())    # in place: linears -> shared bases + mixers
    print(report.format())                            # per-group errors and parameter budget
    ce.save_checkpoint(model, "ckpt/")                # safetensors + JSON, never pickle
    model = ce.load_checkpoint("ckpt/")
    ce.materialize_(model)                            # back to plain nn.Linear
"""
__version__ = "0.1.0"

from .budget import Budget, budget
from .checkpoint import load_checkpoint, save_checkpoint
from .config import CrispConfig, RoleConfig
from .convert import (
    convert_,
    crisp_bases,
    crisp_layers,
    is_crisp,
    materialize_,
    plan_groups,
)
from .errors import (
    CheckpointError,
    ConfigError,
    CrispEdgeError,
    DataError,
    RetrofitError,
    UnknownArchitectureError,
)
from .gates import GATES, PLACEMENTS
from .layer import CrispBasis, CrispLinear
from .models import build_model, create_model, load_embedded_vit
from .retrofit import RetrofitReport, retrofit_
from .specs import ARCHITECTURES, ArchSpec, detect_architecture, register_architecture

__all__ = [
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
