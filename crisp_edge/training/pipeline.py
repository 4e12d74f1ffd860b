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
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crisp_edge.data.tasks import TASKS, load_task
from crisp_edge.errors import ConfigError, CrispEdgeError
from crisp_edge.files.checkpoint import (
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from crisp_edge.files.io import atomic_write_json, check_envelope, read_json
from crisp_edge.files.mixers import read_mixers, save_mixers
from crisp_edge.method.config import CrispConfig
from crisp_edge.models.sources import EMBEDDED_CRISP_CONFIG, source_of
from crisp_edge.training.adapt import AdaptConfig, adapt_
from crisp_edge.training.loop import TrainConfig
from crisp_edge.training.retrofit import retrofit_

PIPELINE_FORMAT = "crisp-edge/pipeline"
PIPELINE_VERSION = 1
STATE_FILE = "pipeline.json"
STAGES = ("retrofit", "compress", "adapt")
#: Where ``--restart`` keeps the earlier run until the new one completes.
PREVIOUS_RUN = ".crisp-edge-previous-run"


class PipelineError(CrispEdgeError, RuntimeError):
    """A pipeline run folder that cannot be resumed as asked."""


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
        tasks: the transfer tasks to adapt (names from ``crisp_edge.data.tasks.TASKS``).
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
        tl = self.train_limit
        if tl is not None and (isinstance(tl, bool) or not isinstance(tl, int) or tl < 1):
            raise ConfigError(f"train_limit must be a positive integer or None, got {tl!r}.")
        object.__setattr__(self, "tasks", tuple(self.tasks))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["crisp"] = self.crisp.to_dict()
        d["tasks"] = list(self.tasks)
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
            lines.append(f"compress: kept {100 * c['kept_fraction']:.1f}% of the targeted weights "
                         f"({c['stored']:,} stored numbers), accuracy {100 * c['accuracy']:.2f}% "
                         f"(teacher {100 * c['teacher_accuracy']:.2f}%) ({c['seconds']:.0f} s)")
        tasks = self.stages.get("adapt", {}).get("tasks", {})
        if tasks:
            rows = [[t, f"{100 * v['accuracy']:.2f}%", f"{v['trainable']:,}", f"{v['bytes']:,} B"] for t, v in tasks.items()]
            lines.append(format_table(["task", "test accuracy", "trainable", "mixer file"], rows))
        if self.resumed:
            lines.append(f"(resumed: {', '.join(self.resumed)} done by an earlier run and verified)")
        return "\n".join(lines)


def _diff(old: Any, new: Any, path: str = "") -> str | None:
    """The first setting (dotted path) where two config dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            d = _diff(old.get(k), new.get(k), f"{path}.{k}" if path else k)
            if d:
                return d
        return None
    return None if old == new else f"{path}: {old!r} then, {new!r} now"


def _own_artifacts(folder: Path, state: dict) -> list[str]:
    """What a run recorded in ``state`` wrote in ``folder`` (relative names; ``pipeline.json`` last)."""
    names = [d for d in ("retrofit", "compressed") if (folder / d).exists()]
    tasks = (state.get("stages", {}).get("adapt") or {}).get("tasks", {})
    names += [r["file"] for r in tasks.values() if isinstance(r, dict) and isinstance(r.get("file"), str)
              and r["file"].startswith("tasks/") and (folder / r["file"]).exists()]
    return names + [STATE_FILE]


def _move(names: list[str], src: Path, dst: Path) -> None:
    for name in names:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        if (dst / name).is_dir():
            shutil.rmtree(dst / name)
        (src / name).rename(dst / name)


class _Run:
    """The run folder's state file: read, check against the settings, record stages atomically.

    ``restart`` never deletes the earlier run before a new one has completed: its own artifacts (the
    stage folders, the mixer files it recorded, ``pipeline.json``; nothing else in the folder) move
    into ``PREVIOUS_RUN``, come back if the new run fails (``restore``), and are deleted once it
    completes (``commit``). A run killed after a restart keeps them until some later run completes."""

    def __init__(self, folder: Path, config: PipelineConfig, restart: bool) -> None:
        self.folder, self.path = folder, folder / STATE_FILE
        self.previous = folder / PREVIOUS_RUN
        settings = config.to_dict()
        if restart and self.path.exists():
            current = read_json(self.path, PipelineError, "pipeline state")
            if (self.previous / STATE_FILE).exists():  # an unfinished restart: what is here is its own partial run
                for name in _own_artifacts(folder, current):
                    p = folder / name
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            else:  # (a move cut short by a kill goes on: pipeline.json moves last)
                self.previous.mkdir(exist_ok=True)
                _move(_own_artifacts(folder, current), folder, self.previous)
        self.restarted = self.previous.exists()
        self.restore_on_failure = restart and self.restarted
        folder.mkdir(parents=True, exist_ok=True)
        self.state = {"format": PIPELINE_FORMAT, "version": PIPELINE_VERSION, "config": settings, "stages": {}}
        if self.path.exists():
            old = read_json(self.path, PipelineError, "pipeline state")
            check_envelope(old, fmt=PIPELINE_FORMAT, max_version=PIPELINE_VERSION,
                           fields={"config": dict, "stages": dict}, error=PipelineError, where=str(self.path),
                           what="pipeline state")
            diff = _diff(old["config"], settings)
            if diff:
                raise PipelineError(f"{folder} holds a pipeline run with other settings ({diff}); use another "
                                    "folder, or restart=True (--restart) to start this one over.")
            self.state["stages"] = old["stages"]
        elif not self.restarted and any(folder.iterdir()):
            raise PipelineError(f"{folder} is not empty and holds no {STATE_FILE}; give the pipeline an empty or new folder.")

    def commit(self) -> None:
        """The new run completed: the previous run's artifacts (after a restart) go."""
        if self.restarted:
            shutil.rmtree(self.previous)

    def restore(self) -> None:
        """The new run failed: remove what it wrote and put the previous run back."""
        if not self.restore_on_failure:
            return
        for name in _own_artifacts(self.folder, self.state):
            p = self.folder / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        old = read_json(self.previous / STATE_FILE, PipelineError, "pipeline state")
        _move(_own_artifacts(self.previous, old), self.previous, self.folder)
        shutil.rmtree(self.previous)

    def done(self, stage: str) -> dict | None:
        return self.state["stages"].get(stage)

    def record(self, stage: str, report: dict) -> None:
        self.state["stages"][stage] = report
        atomic_write_json(self.path, self.state)


def _checkpoint_ok(path: Path) -> bool:
    try:
        read_checkpoint_meta(path)
        return True
    except CrispEdgeError:
        return False


def _mixer_ok(path: Path) -> bool:
    try:
        read_mixers(path)
        return True
    except CrispEdgeError:
        return False


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
        distill_data: images (and labels, used only for reporting) of the base task to distil on;
            default: the Fashion-MNIST training split (the embedded model's own data), of which
            ``config.distill_fraction`` is used.
        eval_data: the base task's test set, to report the teacher's and the student's accuracy;
            default: the Fashion-MNIST test split.
        restart: start over; the earlier run's own files are kept aside until the new run completes,
            and put back if it fails (files the pipeline did not write are never touched).
    Returns a ``PipelineResult``; the deployable checkpoint is ``result.checkpoint`` and the tasks
    ``result.mixer_files``.
    """
    config = config or PipelineConfig()
    folder = Path(out_dir)
    run = _Run(folder, config, restart)
    try:
        result = _stages(run, model, folder, config, distill_data, eval_data, progress, log)
    except BaseException:
        run.restore()
        raise
    run.commit()
    return result


def _stages(run: _Run, model: nn.Module, folder: Path, config: PipelineConfig, distill_data, eval_data,
            progress: bool, log: Callable[[str], None]) -> PipelineResult:
    result = PipelineResult(folder)
    if distill_data is None or eval_data is None:
        from crisp_edge.data.fashion_mnist import load_fashion_mnist

        distill_data = distill_data or load_fashion_mnist("train")
        eval_data = eval_data or load_fashion_mnist("test")

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
    for i, name in enumerate(config.tasks):
        if name in done:
            result.resumed.append(f"adapt {name}")
            continue
        log(f"[3/3] adapt task {name} ({i + 1}/{len(config.tasks)}): mixers + head, bases frozen")
        data = load_task(name, seed=config.seed, train_limit=config.train_limit)
        task_model = copy.deepcopy(student)
        rep = adapt_(task_model, data.x_train, data.y_train, num_classes=data.task.num_classes, config=config.adapt,
                     eval_data=(data.x_test, data.y_test), progress=progress)
        rel = f"tasks/{name}.mixers.safetensors"
        if rec["tasks"].get(name, {}).get("file") == rel:  # this run's own file, damaged: it may go
            (folder / rel).unlink(missing_ok=True)
        save_mixers(task_model, folder / rel, task=name, labels=list(data.task.class_names))
        done[name] = {"file": rel, "accuracy": rep.accuracy, "trainable": rep.trainable_total,
                      "bytes": (folder / rel).stat().st_size, "bases_unchanged": rep.bases_unchanged,
                      "seconds": rep.history.seconds}
        run.record("adapt", {"tasks": dict(done)})
    result.stages["adapt"] = {"tasks": {t: done[t] for t in config.tasks}}
    return result


def _compress(teacher: nn.Module, config: PipelineConfig, distill_data, eval_data, progress: bool) -> tuple[nn.Module, dict]:
    from crisp_edge.training.compress.distill import DistillConfig
    from crisp_edge.training.compress.vit import compress_vit
    from crisp_edge.training.evaluate import accuracy, predict

    x, _ = distill_data
    g = torch.Generator().manual_seed(config.seed)
    idx = torch.randperm(len(x), generator=g)[: max(1, round(config.distill_fraction * len(x)))]
    t0 = time.perf_counter()
    student, report = compress_vit(teacher, config.keep_fraction, x[idx], method=config.allocator,
                                   config=DistillConfig(epochs=config.distill_epochs, seed=config.seed),
                                   progress=progress)
    seconds = time.perf_counter() - t0
    xe, ye = eval_data
    rec = {"checkpoint": "compressed", "keep_fraction": config.keep_fraction, "allocator": config.allocator,
           "kept_fraction": report.kept_fraction, "stored": report.stored, "distill_images": len(idx),
           "accuracy": accuracy(predict(student, xe), ye), "teacher_accuracy": accuracy(predict(teacher, xe), ye),
           "seconds": seconds, "peak_rss_mb": report.peak_rss_mb, "ranks": report.plan.role_ranks}
    return student, rec
