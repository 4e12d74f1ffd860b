"""``TaskSwitcher``: several tasks for one live PyTorch model, each a mixer file read and checked once."""
from __future__ import annotations

import os

from torch import nn

from crisp_edge.errors import MixerFileError
from crisp_edge.files.mixers import (
    MixerFile,
    check_mixers,
    head_module,
    read_mixers,
    task_tensors,
    write_task_tensors_,
)
from crisp_edge.method.convert import crisp_bases


class TaskSwitcher:
    """Several tasks for one live model: each mixer file is read and checked once, when added;
    ``switch`` then only copies a few kilobytes into the model.

    A task is "the base model with the file's tensors": whatever a file does not hold (its head,
    the layer biases) comes from the model as it was when the switcher was made, so switching is
    order-independent and switching back reproduces a task's outputs bit for bit.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        found = head_module(model)
        self._base = {k: v.clone() for k, v in task_tensors(model, head=found is not None,
                                                              biases=_all_have_bias(model)).items()}
        self.tasks: dict[str, MixerFile] = {}
        self.active: str | None = None

    def add(self, mixers: MixerFile | str | os.PathLike) -> str:
        mf = mixers if isinstance(mixers, MixerFile) else read_mixers(mixers)
        check_mixers(self.model, mf)
        self.tasks[mf.task] = mf
        return mf.task

    def switch(self, task: str) -> None:
        """Make ``task`` (the name of a file given to ``add``) the active one."""
        if task not in self.tasks:
            raise MixerFileError(f"no task {task!r} loaded; loaded: {sorted(self.tasks)}.")
        write_task_tensors_(self.model, {**self._base, **self.tasks[task].tensors})
        self.active = task

    def reset(self) -> None:
        """Back to the model as it was when the switcher was made."""
        write_task_tensors_(self.model, self._base)
        self.active = None


def _all_have_bias(model: nn.Module) -> bool:
    return all(l.bias is not None for b in crisp_bases(model).values() for l in
               (model.get_submodule(n) for n in b.layer_names))
