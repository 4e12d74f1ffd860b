"""The README's results tables are rendered from bench/results/*.json, never typed by hand."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_tables_match_benchmark_json():
    spec = importlib.util.spec_from_file_location("render_readme", ROOT / "bench" / "render_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (ROOT / "README.md").read_text()
    assert module.render(text) == text, "run `.venv/bin/python bench/render_readme.py` after a benchmark"
    for name in module.RENDERERS:
        if (ROOT / "bench" / "results" / f"{name}.json").exists():
            assert f"<!-- results:{name} -->\n|" in text, f"README lacks the rendered {name} table"
