"""Feeding a runtime session: every input as a contiguous numpy array of the dtype the exported model
takes (float32 for images and features, int64 / int32 for token ids and attention masks).

Shared by the ONNX Runtime and ExecuTorch sessions; numpy only, so a session imports no training code.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from crisp_edge.export.errors import BundleError, ExportError

#: Input dtypes an exported model may take, by the name bundles record (``manifest["inputs"][i]["dtype"]``).
INPUT_DTYPES: dict[str, type] = {"float32": np.float32, "int64": np.int64, "int32": np.int32}


def input_dtype(name: Any, where: str) -> type:
    """The numpy dtype of a recorded input dtype name (a ``BundleError`` for any other)."""
    if name not in INPUT_DTYPES:
        raise BundleError(f"{where}: input dtype {name!r:.40} is not one of {sorted(INPUT_DTYPES)}.")
    return INPUT_DTYPES[name]


def as_input_array(x: Any, dtype: type = np.float32, name: str = "x") -> np.ndarray:
    """``x`` (numpy, torch or nested lists) as a contiguous array of ``dtype``. Float inputs are cast;
    an integer input refuses float values (token ids are never silently truncated) and values outside
    its range."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if dtype is not np.float32:  # an integer input (token ids, masks, positions): never truncate floats
        a = np.asarray(x)
        if a.dtype.kind not in "iub":
            raise ExportError(f"input {name!r} takes integers ({np.dtype(dtype).name}, e.g. token ids); got "
                              f"{a.dtype.name} values. Pass an integer array or tensor.")
        if a.size and (a.min() < np.iinfo(dtype).min or a.max() > np.iinfo(dtype).max):
            raise ExportError(f"input {name!r} holds values outside the {np.dtype(dtype).name} range.")
        return np.ascontiguousarray(a, dtype=dtype)
    try:
        return np.ascontiguousarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ExportError(f"input {name!r} must be a float array or tensor ({type(e).__name__}: {e}).") from None
