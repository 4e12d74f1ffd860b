"""The joint pipeline (Alg. 6): retrofit -> compress -> freeze bases -> adapt mixers per task.

One Python call (``run_pipeline``) and one command (``crisp-edge pipeline``). Each stage writes its
result into the run folder and records it in ``pipeline.json``; a run started again with the same
settings skips the stages that are done (their files are verified, not trusted), so a run killed in
the middle of compression resumes there rather than retrofitting again::

    run/
      pipeline.json                  settings + the stages done, with their reports
      retrofit/                      full-capacity CRISP checkpoint (the distillation teacher)
      compressed/                    compressed CRISP checkpoint (the deployable bases)
      tasks/<task>.mixers.safetensors  one mixer file per task, bound to the compressed bases

Starting again with other settings in the same folder is refused with the setting that differs
(pass ``restart=True`` / ``--restart`` to start over).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crisp_edge.data.labeled import LabeledData
from crisp_edge.data.tasks import TASKS, load_task
from crisp_edge.errors import ConfigError
from crisp_edge.files.checkpoint import (
    load_checkpoint,
    save_checkpoint,
)
from crisp_edge.files.mixers import save_mixers
from crisp_edge.method.config import CrispConfig
from crisp_edge.models.sources import EMBEDDED_CRISP_CONFIG, source_of
from crisp_edge.training.adapt import AdaptConfig, adapt_
from crisp_edge.training.loop import TrainConfig
from crisp_edge.training.pipeline_run import (  # noqa: F401  (STATE_FILE, PipelineError: public names)
    STATE_FILE,
    PipelineError,
    _checkpoint_ok,
    _mixer_ok,
    _Run,
)
from crisp_edge.training.retrofit import retrofit_


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of one pipeline run (all of them recorded in ``pipeline.json``).

    Attributes:
        crisp: the CRISP layout to retrofit to (full capacity: the teacher).
        keep_fraction: the fraction of the targeted linear parameters the compressed bases keep
            (0.5 = 50% reduction); ``None`` skips compression (adapt the full-capacity model).
        allocator: how the budget becomes per-role ranks ("greedy", the benchmark's winner at 50%, or "uniform").
        distill_fraction: the slice of the base training set used for distillation.
        distill_epochs: passes over that slice.
        tasks: the built-in transfer tasks to adapt (names from ``crisp_edge.data.tasks.TASKS``; their
            images are 28x28 grey, for models that take those).
        data: your own tasks, ``(name, path)`` pairs: data in any form ``data.formats.load_dataset``
            reads, with the model's own input spec; ``val_fraction`` of each is held out for validation.
        distill_data: a path of distillation inputs (labels optional); default: Fashion-MNIST for models
            that take 28x28 grey images, else the training inputs of ``data``'s tasks.
        adapt: how each task's mixers are trained.
        train_limit: use at most this many training images per task (quick runs); None = all.
        seed: seeds the distillation slice and the training runs.
    """

    crisp: CrispConfig = EMBEDDED_CRISP_CONFIG
    keep_fraction: float | None = 0.5
    allocator: str = "greedy"
    distill_fraction: float = 0.03
    distill_epochs: int = 4
    tasks: tuple[str, ...] = ("mnist", "digits")
    adapt: AdaptConfig = field(default_factory=lambda: AdaptConfig(train=TrainConfig(epochs=8, batch_size=64)))
    train_limit: int | None = None
    seed: int = 0
    data: tuple[tuple[str, str], ...] = ()
    val_fraction: float = 0.1
    distill_data: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.crisp, CrispConfig):
            raise ConfigError(f"crisp must be a CrispConfig, got {type(self.crisp).__name__}.")
        kf = self.keep_fraction
        if kf is not None and (isinstance(kf, bool) or not isinstance(kf, (int, float)) or not 0 < kf < 1):
            raise ConfigError(f"keep_fraction must be in (0, 1) (e.g. 0.5 for a 50% reduction) or None, got {kf!r}.")
        if self.allocator not in ("uniform", "greedy"):
            raise ConfigError(f"allocator must be 'uniform' or 'greedy', got {self.allocator!r}.")
        df = self.distill_fraction
        if isinstance(df, bool) or not isinstance(df, (int, float)) or not 0 < df <= 1:
            raise ConfigError(f"distill_fraction must be in (0, 1], got {df!r}.")
        if isinstance(self.distill_epochs, bool) or not isinstance(self.distill_epochs, int) or self.distill_epochs < 1:
            raise ConfigError(f"distill_epochs must be a positive integer, got {self.distill_epochs!r}.")
        if isinstance(self.tasks, str) or not isinstance(self.tasks, (tuple, list)):
            raise ConfigError(f"tasks must be a tuple of task names, got {self.tasks!r}.")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks must be distinct names from {sorted(TASKS)}, got {list(self.tasks)}.")
        if not isinstance(self.adapt, AdaptConfig):
            raise ConfigError(f"adapt must be an AdaptConfig, got {type(self.adapt).__name__}.")
        if isinstance(self.data, (str, bytes)) or not all(
                isinstance(d, (tuple, list)) and len(d) == 2 and all(isinstance(s, str) and s for s in d) for d in self.data):
            raise ConfigError(f"data must be (task name, path) pairs, got {self.data!r}.")
        names = [n for n, _ in self.data] + list(self.tasks)
        if len(set(names)) != len(names):
            raise ConfigError(f"task names must be distinct, got {names}.")
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0 < vf < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {vf!r}.")
        object.__setattr__(self, "data", tuple((str(n), str(p)) for n, p in self.data))
        tl = self.train_limit
        if tl is not None and (isinstance(tl, bool) or not isinstance(tl, int) or tl < 1):
            raise ConfigError(f"train_limit must be a positive integer or None, got {tl!r}.")
        object.__setattr__(self, "tasks", tuple(self.tasks))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["crisp"] = self.crisp.to_dict()
        d["tasks"] = list(self.tasks)
        d["data"] = [list(pair) for pair in self.data]
        for key, default in (("data", []), ("val_fraction", 0.1), ("distill_data", None)):
            if d[key] == default:  # settings added later: runs recorded before them still resume
                del d[key]
        return d


@dataclass
class PipelineResult:
    """What a run produced: the folder, the stage reports, and the paths of its artifacts."""

    folder: Path
    stages: dict[str, dict] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)

    @property
    def checkpoint(self) -> Path:
        """The deployable checkpoint: the compressed one, or the retrofit one without compression."""
        return self.folder / ("compressed" if "compress" in self.stages and not self.stages["compress"].get("skipped")
                              else "retrofit")

    @property
    def mixer_files(self) -> dict[str, Path]:
        return {t: self.folder / r["file"] for t, r in self.stages.get("adapt", {}).get("tasks", {}).items()}

    def summary(self) -> str:
        from crisp_edge.report import format_table

        lines = []
        r = self.stages.get("retrofit", {})
        if r:
            lines.append(f"retrofit: worst layer error {r['max_error']:.1e}, {r['stored']:,} stored numbers "
                         f"({r['seconds']:.1f} s)")
        c = self.stages.get("compress", {})
        if c and not c.get("skipped"):
            acc = "" if c.get("accuracy") is None else \
                f", accuracy {100 * c['accuracy']:.2f}% (teacher {100 * c['teacher_accuracy']:.2f}%)"
            lines.append(f"compress: kept {100 * c['kept_fraction']:.1f}% of the targeted weights "
                         f"({c['stored']:,} stored numbers){acc} ({c['seconds']:.0f} s)")
        tasks = self.stages.get("adapt", {}).get("tasks", {})
        if tasks:
            rows = [[t, f"{100 * v['accuracy']:.2f}%", f"{v['trainable']:,}", f"{v['bytes']:,} B"] for t, v in tasks.items()]
            lines.append(format_table(["task", "test accuracy", "trainable", "mixer file"], rows))
        if self.resumed:
            lines.append(f"(resumed: {', '.join(self.resumed)} done by an earlier run and verified)")
        return "\n".join(lines)


def run_pipeline(model: nn.Module, out_dir: str | Path, config: PipelineConfig | None = None, *,
                 distill_data: tuple[torch.Tensor, torch.Tensor] | None = None,
                 eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
                 restart: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print) -> PipelineResult:
    """Alg. 6 on ``model`` (a plain pretrained model): retrofit, compress, then adapt each task.

    Args:
        model: the pretrained model (not modified).
        out_dir: the run folder (created; resumed when it holds a run with the same settings).
        config: the run's settings (default: the embedded ViT's layout, 50% reduction, mnist + digits).
        distill_data: inputs of the base task to distil on (a tensor, ``(x, y)``, a Dataset, ...; labels
            unused), of which ``config.distill_fraction`` is used; default: ``config.distill_data``, else
            the Fashion-MNIST training split for models that take 28x28 grey images, else the training
            inputs of ``config.data``'s tasks.
        eval_data: the base task's labelled test set, to report the teacher's and the student's
            accuracy; default: the Fashion-MNIST test split with Fashion-MNIST distillation, else none.
        restart: start over; the earlier run's own files are kept aside until the new run completes,
            and put back if it fails (files the pipeline did not write are never touched).

    Every task's data and the distillation inputs are read and checked against the model's own
    ``InputSpec`` first: bad data is a DataError before any stage runs or any file is written.
    Returns a ``PipelineResult``; the deployable checkpoint is ``result.checkpoint`` and the tasks
    ``result.mixer_files``.
    """
    config = config or PipelineConfig()
    folder = Path(out_dir)
    # all data is read and checked against the model's input spec before the run folder is touched
    tasks, distill_data, eval_data = _load_data(model, config, distill_data, eval_data, progress)
    run = _Run(folder, config, restart)
    try:
        result = _stages(run, model, folder, config, tasks, distill_data, eval_data, progress, log)
    except BaseException:
        run.restore()
        raise
    run.commit()
    return result


def _stages(run: _Run, model: nn.Module, folder: Path, config: PipelineConfig, tasks: dict, distill_data, eval_data,
            progress: bool, log: Callable[[str], None]) -> PipelineResult:
    result = PipelineResult(folder)

    # 1. retrofit at full capacity: the teacher
    ckpt = folder / "retrofit"
    rec = run.done("retrofit")
    if rec and _checkpoint_ok(ckpt):
        teacher = load_checkpoint(ckpt)
        result.resumed.append("retrofit")
    else:
        log("[1/3] retrofit: full-capacity CRISP model (closed form)")
        teacher = copy.deepcopy(model).eval()
        rep = retrofit_(teacher, config.crisp, progress=progress)
        save_checkpoint(teacher, ckpt, source=source_of(model), extra={"retrofit": rep.to_dict()})
        rec = {"checkpoint": "retrofit", "max_error": rep.max_error, "stored": rep.budget.stored,
               "seconds": rep.seconds}
        run.record("retrofit", rec)
    result.stages["retrofit"] = rec

    # 2. compress the bases (Alg. 4): distil a smaller-basis student from the teacher
    ckpt = folder / "compressed"
    rec = run.done("compress")
    if config.keep_fraction is None:
        student, rec = teacher, {"skipped": True}
        run.record("compress", rec)
    elif rec and _checkpoint_ok(ckpt):
        student = load_checkpoint(ckpt)
        result.resumed.append("compress")
    else:
        log(f"[2/3] compress: keep {100 * config.keep_fraction:.0f}% of the targeted weights, distil on "
            f"{100 * config.distill_fraction:.0f}% of the base training set")
        student, rec = _compress(teacher, config, distill_data, eval_data, progress)
        save_checkpoint(student, ckpt, source=source_of(model), extra={"compress": rec})
        run.record("compress", rec)
    result.stages["compress"] = rec

    # 3. freeze the bases, adapt mixers (+ head) per task (Alg. 3)
    rec = dict(run.done("adapt") or {"tasks": {}})
    done = {t: r for t, r in rec["tasks"].items() if _mixer_ok(folder / r["file"])}
    for i, (name, (train, val)) in enumerate(tasks.items()):
        if name in done:
            result.resumed.append(f"adapt {name}")
            continue
        log(f"[3/3] adapt task {name} ({i + 1}/{len(tasks)}): mixers + head, bases frozen")
        task_model = copy.deepcopy(student)
        rep = adapt_(task_model, train, num_classes=train.num_classes, config=config.adapt, eval_data=val,
                     progress=progress)
        rel = f"tasks/{name}.mixers.safetensors"
        if rec["tasks"].get(name, {}).get("file") == rel:  # this run's own file, damaged: it may go
            (folder / rel).unlink(missing_ok=True)
        save_mixers(task_model, folder / rel, task=name,
                    labels=list(train.class_names) if train.class_names else None)
        done[name] = {"file": rel, "accuracy": rep.accuracy, "trainable": rep.trainable_total,
                      "bytes": (folder / rel).stat().st_size, "bases_unchanged": rep.bases_unchanged,
                      "seconds": rep.history.seconds}
        run.record("adapt", {"tasks": dict(done)})
    result.stages["adapt"] = {"tasks": {t: done[t] for t in tasks}}
    return result


def _load_data(model: nn.Module, config: PipelineConfig, distill_data, eval_data, progress: bool):
    """``(tasks, distill_data, eval_data)``: every task's (train, validation) ``LabeledData`` and the
    compression stage's inputs, read with the model's own ``InputSpec`` and checked against it, so bad
    data or a task the model cannot take is an error before any stage runs or any file is written."""
    from crisp_edge.data.feed import feed, model_spec
    from crisp_edge.data.labeled import split_validation
    from crisp_edge.errors import DataError

    spec = model_spec(model)
    grey28 = spec is not None and spec.kind == "image" and spec.shape == (1, 28, 28)
    tasks: dict[str, tuple[LabeledData, LabeledData]] = {}
    for name in config.tasks:
        if spec is not None and not grey28:
            raise DataError(f"the built-in task {name!r} has 28x28 grey images but the model takes {spec.describe()} "
                            f"({spec.source}); pass your own data for it (data=[(name, path)], --data PATH).")
        d = load_task(name, seed=config.seed, train_limit=config.train_limit)
        names = tuple(d.task.class_names)
        tasks[name] = (LabeledData(d.x_train, d.y_train, class_names=names, source=f"task {name} (train)"),
                       LabeledData(d.x_test, d.y_test, class_names=names, source=f"task {name} (test)"))
    for name, path in config.data:
        train = feed(path, model=model, what=f"task {name}", progress=progress)
        if config.train_limit is not None and len(train) > config.train_limit:
            train = train.subset(list(range(config.train_limit)))
        tasks[name] = split_validation(train, config.val_fraction, seed=config.seed)
    if config.keep_fraction is None:
        return tasks, distill_data, eval_data
    if distill_data is None and config.distill_data is not None:
        distill_data = feed(config.distill_data, model=model, labels="optional", what="distillation data",
                            progress=progress)
    elif distill_data is None and (grey28 or spec is None) and not config.data:
        from crisp_edge.data.fashion_mnist import load_fashion_mnist

        distill_data = load_fashion_mnist("train")
        eval_data = eval_data or load_fashion_mnist("test")
    elif distill_data is None and config.data:
        distill_data = _joined([tasks[n][0] for n, _ in config.data])
    if distill_data is None:
        raise DataError(f"compression distils on inputs the model takes ({spec.describe() if spec else 'unknown'}); "
                        "give distill_data (--distill-data PATH) or your own task data (--data PATH), or "
                        "keep_fraction=None (--keep 1) to skip compression.")
    d = distill_data if isinstance(distill_data, LabeledData) else feed(
        distill_data[0] if isinstance(distill_data, tuple) else distill_data, model=model, labels="optional",
        what="distillation data")
    if d.x is None:
        raise DataError(f"distillation data {d.source} is text, and the model records no tokenizer to turn it into "
                        "token ids; retrofit with --tokenizer DIR (a Hugging Face folder or a .gguf file).")
    from crisp_edge.training.loop import check_inputs

    check_inputs(model, d.x, what="distillation data")
    if eval_data is not None:
        check_inputs(model, eval_data[0], what="evaluation data")
    return tasks, (d.x, d.attention_mask), eval_data


def _joined(parts: list[LabeledData]) -> LabeledData:
    """The inputs of several ``LabeledData`` as one (labels dropped): token ids of different widths are
    right-padded, and the attention masks (ones where a part has none) say where the padding is."""
    xs = [p.x for p in parts]
    if len({tuple(x.shape[1:]) for x in xs}) == 1 and all(p.attention_mask is None for p in parts):
        return LabeledData(torch.cat(xs), None, source="the tasks' training inputs")
    width = max(x.shape[1] for x in xs)
    masks = [p.attention_mask if p.attention_mask is not None else torch.ones_like(p.x) for p in parts]
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731 - zeros: masked out
    return LabeledData(torch.cat([pad(x) for x in xs]), None, attention_mask=torch.cat([pad(m) for m in masks]),
                       source="the tasks' training inputs")


def _compress(teacher: nn.Module, config: PipelineConfig, distill_data, eval_data, progress: bool) -> tuple[nn.Module, dict]:
    from crisp_edge.training.compress.distill import DistillConfig
    from crisp_edge.training.compress.vit import compress_vit
    from crisp_edge.training.evaluate import accuracy, predict

    x, mask = distill_data
    g = torch.Generator().manual_seed(config.seed)
    idx = torch.randperm(len(x), generator=g)[: max(1, round(config.distill_fraction * len(x)))]
    t0 = time.perf_counter()
    student, report = compress_vit(teacher, config.keep_fraction, x[idx], method=config.allocator,
                                   config=DistillConfig(epochs=config.distill_epochs, seed=config.seed,
                                                        batch_size=min(DistillConfig().batch_size, len(idx))),
                                   attention_mask=None if mask is None else mask[idx], progress=progress)
    seconds = time.perf_counter() - t0
    acc = {"accuracy": None, "teacher_accuracy": None}
    if eval_data is not None:
        xe, ye = eval_data
        acc = {"accuracy": accuracy(predict(student, xe), ye), "teacher_accuracy": accuracy(predict(teacher, xe), ye)}
    rec = {"checkpoint": "compressed", "keep_fraction": config.keep_fraction, "allocator": config.allocator,
           "kept_fraction": report.kept_fraction, "stored": report.stored, "distill_images": len(idx), **acc,
           "seconds": seconds, "peak_rss_mb": report.peak_rss_mb, "ranks": report.plan.role_ranks}
    return student, rec
