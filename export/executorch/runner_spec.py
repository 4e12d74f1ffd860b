"""A plain-text summary written beside the program: the bundle's mode, tag, input/output names and
shapes, and the ``set_task`` inputs in the program's order. The C++ runner (export/executorch/runner)
no longer reads it: it reads and verifies manifest.json (see the runner's README)."""
from __future__ import annotations


def runner_spec(manifest: dict) -> str:
    """The plain-text summary (mode, tag, shapes and names) of ``manifest``."""
    def tensor(kind: str, name: str, shape: list) -> str:
        return f"{kind} {name} {len(shape)} {' '.join(map(str, shape))}"

    swap = manifest.get("swappable") or {}
    head = swap.get("head") or {}
    lines = ["crisp-edge-et-runner 1", f"mode {manifest['mode']}", f"tag {swap.get('tag', 0)}",
             f"classes {head.get('num_classes', 0)}"]
    lines += [tensor("input", i["name"], i["shape"]) for i in manifest["inputs"]]
    lines += [f"output {o['name']}" for o in manifest["outputs"]]
    lines += [tensor("set_task", i["name"], i["shape"]) for i in swap.get("set_task_inputs", [])]
    return "\n".join(lines) + "\n"
