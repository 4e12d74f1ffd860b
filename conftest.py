"""Set-up shared by both test trees (``tests/`` and ``runtime_tests/``), loaded by pytest before either.

No model hub, here or in CI: every test loads weights from files it wrote. Offline mode turns any
accidental hub lookup (timm ``pretrained=True``, ``from_pretrained`` of a name) into an immediate error
instead of a network wait. Set before timm / transformers / huggingface_hub are imported, for a run of
``runtime_tests/`` alone too.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
