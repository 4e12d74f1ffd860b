"""The ``crisp-edge`` command line: ``main`` (in ``crisp_edge.cli.main``) and one module per subcommand.

    crisp-edge demo                                  # the whole path on the embedded ViT
    crisp-edge retrofit fmnist-vit --out ckpt/       # convert + fit, save a checkpoint
    crisp-edge retrofit timm:vit_small_patch16_224 --weights vit_s.safetensors --s 4 --r 8 --group-size 4 --out ckpt/
    crisp-edge info ckpt/                            # what was converted, budgets, errors

``python -m crisp_edge.cli ...`` runs the same command.
"""
from crisp_edge.cli.main import main

__all__ = ["main"]
