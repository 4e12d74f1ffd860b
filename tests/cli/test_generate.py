"""``crisp-edge generate`` refusals that need no runtime (the generation itself: runtime_tests/executorch/test_lm.py)."""
from __future__ import annotations

import pytest

from crisp_edge.cli.main import main


def test_missing_bundle_and_bad_prompt_ids(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nothing"), "--prompt", "hi"]) == 2
    assert "not a bundle folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", str(tmp_path), "--prompt-ids", "1,x"])
    assert e.value.code == 2 and "comma-separated token ids" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", str(tmp_path), "--prompt-ids", "1", "--max-new-tokens", "0"])
