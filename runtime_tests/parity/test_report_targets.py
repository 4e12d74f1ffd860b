"""Parity reports and --save-outputs replace only files this tool wrote (issue 16): a rerun refreshes its
own reports; a user's file at a report path is refused before anything is written, and kept."""
from __future__ import annotations

import pytest

from crisp_edge.errors import ConfigError
from crisp_edge.export import export_onnx
from crisp_edge.export.parity.check import check_bundle
from crisp_edge.export.parity.report import check_outputs_target, check_report_target, write_reports
from crisp_edge.testing import toy_model

pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    bundle = export_onnx(toy_model("timm-vit"), tmp_path_factory.mktemp("b") / "b", mode="dense")
    return check_bundle(bundle)


def test_a_rerun_replaces_its_own_reports(report, tmp_path):
    first = write_reports(report, tmp_path / "r")
    again = write_reports(report, tmp_path / "r")
    assert set(first) == set(again) == {"json", "junit", "plot"}
    for kind, path in again.items():
        assert check_report_target(path, kind) == path  # each one recognised as a report it wrote


@pytest.mark.parametrize("kind, name", [("json", "parity.json"), ("junit", "parity.junit.xml"), ("plot", "parity.png")])
def test_a_users_file_at_a_report_path_is_refused_and_kept(report, tmp_path, kind, name):
    folder = tmp_path / "r"
    folder.mkdir()
    mine = folder / name
    mine.write_text("the user's own notes")
    with pytest.raises(ConfigError, match="not a crisp-edge parity report"):
        write_reports(report, folder)
    assert mine.read_text() == "the user's own notes"
    assert sorted(p.name for p in folder.iterdir()) == [name]  # nothing else was written either


def test_save_outputs_replaces_only_an_outputs_file(tmp_path):
    import numpy as np

    ours = tmp_path / "o.npz"
    np.savez(ours, **{"output.default.0.logits": np.zeros(3)})
    assert check_outputs_target(ours) == ours
    theirs = tmp_path / "t.npz"
    np.savez(theirs, weights=np.zeros(3))
    with pytest.raises(ConfigError, match="not an outputs file"):
        check_outputs_target(theirs)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="not an outputs file"):
        check_outputs_target(tmp_path / "notes.txt")
    assert check_outputs_target(tmp_path / "new.npz") == tmp_path / "new.npz"
