"""crisp_edge.export: the deploy side (ONNX Runtime and ExecuTorch exporters, export bundles).

This folder is the top-level ``export/`` of the repository, installed as ``crisp_edge.export``
(see pyproject.toml): a bare top-level module named ``export`` would collide with an unrelated
package of that name on PyPI.
"""
