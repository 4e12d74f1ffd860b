"""The crisp-edge command line: retrofit -> info round trip, overrides, and clear errors."""
from __future__ import annotations

import json

import pytest

from crisp_edge.cli import main
from crisp_edge.cli.retrofit import _parse_role_override
from crisp_edge.errors import ConfigError


def test_retrofit_then_info(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["retrofit", "fmnist-vit", "--out", str(out), "--group-size", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "qkv_0_2" in printed and "worst layer error" in printed
    assert (out / "model.safetensors").exists() and (out / "crisp.json").exists()

    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "timm-vit"
    assert info["budget"]["trainable_per_task"] == 6 * 4 * 12 * 4  # 6 blocks x 4 roles x r=12 x s=4
    assert info["retrofit"]["max_rel_error"] <= 1e-5

    assert main(["info", str(out)]) == 0
    assert "fc2_3_5" in capsys.readouterr().out


def test_role_overrides_and_targets(tmp_path, capsys):
    out = tmp_path / "ckpt"
    args = ["retrofit", "fmnist-vit", "--out", str(out), "--targets", "fc1,fc2", "--role", "fc1:s=8,r=16,group_size=all",
            "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    groups = {g["key"]: g for g in json.loads(capsys.readouterr().out)["budget"]["groups"]}
    assert set(groups) == {"fc1_0_5", "fc2_0_3", "fc2_4_5"}
    assert (groups["fc1_0_5"]["s"], groups["fc1_0_5"]["r"]) == (8, 16)


@pytest.mark.parametrize("argv, needle", [
    (["retrofit", "fmnist-vit", "--s", "5"], "does not divide"),
    (["retrofit", "fmnist-vit", "--r", "0"], "r must be >= 1"),
    (["retrofit", "fmnist-vit", "--targets", "nope"], "not roles of timm-vit"),
    (["retrofit", "no-such-model"], "unknown model"),
    (["retrofit", "fmnist-vit", "--gate", "relu"], "method='gradient'"),
])
def test_bad_input_exits_2_with_message(argv, needle, capsys):
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "error:" in err


def test_info_on_missing_checkpoint(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


def test_parse_role_override():
    assert _parse_role_override("fc1:s=8,r=full,group_size=all") == ("fc1", {"s": 8, "r": None, "group_size": None})
    with pytest.raises(ConfigError, match="key=value"):
        _parse_role_override("fc1:bogus=1")
    with pytest.raises(ConfigError, match="ROLE:key=value"):
        _parse_role_override("fc1")


def test_adapt_then_apply(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["retrofit", "fmnist-vit", "--out", str(ckpt), "--group-size", "3", "--no-progress"]) == 0
    mixers = tmp_path / "digits.safetensors"
    assert main(["adapt", str(ckpt), "--task", "digits", "--epochs", "1", "--train-limit", "256", "--out", str(mixers),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "task digits: test accuracy" in out and "bases unchanged: True" in out and mixers.exists()
    assert main(["apply", str(ckpt), str(mixers), "--out", str(tmp_path / "applied")]) == 0
    out = capsys.readouterr().out
    assert "digits" in out and "ms" in out and (tmp_path / "applied" / "crisp.json").exists()


def test_apply_refuses_mixers_for_another_layout(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["retrofit", "fmnist-vit", "--out", str(a), "--group-size", "3", "--no-progress"]) == 0
    assert main(["retrofit", "fmnist-vit", "--out", str(b), "--group-size", "2", "--no-progress"]) == 0
    mixers = tmp_path / "m.safetensors"
    assert main(["adapt", str(a), "--task", "digits", "--epochs", "1", "--train-limit", "64", "--out", str(mixers),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["apply", str(b), str(mixers)]) == 2
    assert "groups differ" in capsys.readouterr().err
