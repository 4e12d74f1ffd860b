"""Plain-text tables for the terminal (the CLI and the demo print these)."""
from __future__ import annotations

from crisp_edge.method.budget import Budget


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c: object) -> str:
    if isinstance(c, float):
        return f"{c:.2e}" if (c != 0 and abs(c) < 1e-2) else f"{c:.3f}"
    if isinstance(c, int):
        return f"{c:,}"
    return str(c)


def format_budget(b: Budget, errors: dict[str, float] | None = None) -> str:
    """One row per group (shape, u, r/full, s, stored, trainable, worst error), then totals."""
    headers = ["group", "layers", "d_out x d_in", "u", "r/full", "s", "stored", "trainable"]
    if errors is not None:
        headers.append("max rel err")
    rows = []
    for g in b.groups:
        row = [g.key, g.n_layers, f"{g.d_out} x {g.d_in}", g.u, f"{g.r}/{g.full_rank}", g.s, g.stored, g.trainable]
        if errors is not None:
            row.append(errors.get(g.key, float("nan")))
        rows.append(row)
    totals = (
        f"targeted dense weights {b.original:,} -> stored {b.stored:,} "
        f"(kept {100 * b.kept_fraction:.1f}%, compression {b.compression:.2f}x); "
        f"trainable per task {b.trainable_per_task:,} (max {b.max_trainable_per_layer} per layer)"
    )
    return format_table(headers, rows) + "\n" + totals
