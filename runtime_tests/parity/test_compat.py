"""Bundles written by crisp-edge 0.1.0 before the package was reorganised (tests/fixtures/v0.1.0, made at
commit ba9a53f) still load, verify, switch tasks and pass parity in both runtimes."""
from __future__ import annotations

from pathlib import Path

import pytest

from crisp_edge.export.bundle import open_bundle
from crisp_edge.export.parity.check import check_bundle

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "v0.1.0"

pytestmark = pytest.mark.runtime


@pytest.mark.parametrize("folder, runtime", [("onnx", "onnxruntime"), ("et", "executorch")])
def test_old_bundle_passes_parity_on_every_task(folder, runtime):
    got, bundle = open_bundle(FIXTURES / folder)
    assert got == runtime and sorted(bundle.tasks) == ["task1"]
    report = check_bundle(bundle)
    assert report.passed, report.format()
    assert {c.task for c in report.comparisons} == {"default", "task1"}
