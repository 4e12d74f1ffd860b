"""CrispConfig / RoleConfig: validation with helpful messages, immutability, versioned JSON."""
from __future__ import annotations

import dataclasses
import json

import pytest

from crisp_edge import ConfigError, CrispConfig, RoleConfig
from crisp_edge.method.config import CONFIG_FORMAT, CONFIG_VERSION

CONFIGS = [
    CrispConfig(),
    CrispConfig(default=RoleConfig(s=8, r=16, group_size=None, gate="gelu", placement="temp"), gate_init_max=0.1),
    CrispConfig(default=RoleConfig(s=2), roles={"fc1": RoleConfig(s=8, r=3), "qkv": RoleConfig(gate="none",
                placement="post", group_size=1)}, targets=("qkv", "fc1", "fc2")),
    CrispConfig(targets=["fc2"]),  # a list is accepted and stored as a tuple
    CrispConfig(roles={"fc2": RoleConfig(s=32, transpose=True)}),
]


def test_defaults_are_the_papers():
    rc = CrispConfig().default
    assert (rc.s, rc.r, rc.group_size, rc.gate, rc.placement) == (4, None, 4, "silu", "pre")
    assert CrispConfig().targets is None


@pytest.mark.parametrize("config", CONFIGS)
def test_json_round_trip(config):
    text = config.to_json()
    back = CrispConfig.from_json(text)
    assert back == config
    assert back.to_json() == text
    d = json.loads(text)
    assert d["format"] == CONFIG_FORMAT and d["version"] == CONFIG_VERSION
    assert CrispConfig.from_dict(config.to_dict()) == config


def test_transpose_is_written_only_when_set():
    """Configs without transposed roles keep the JSON they had before ``transpose`` existed."""
    assert "transpose" not in CrispConfig().to_json()
    d = CrispConfig(roles={"fc2": RoleConfig(transpose=True)}).to_dict()
    assert d["roles"]["fc2"]["transpose"] is True and "transpose" not in d["default"]


def test_targets_become_a_tuple():
    assert CrispConfig(targets=["fc2", "fc1"]).targets == ("fc2", "fc1")


def test_frozen():
    config = CrispConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.default = RoleConfig(s=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.gate_init_max = 0.2
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.default.s = 8


def test_with_role_copies():
    config = CrispConfig(default=RoleConfig(s=4))
    changed = config.with_role("fc1", r=12)
    assert changed.role("fc1") == RoleConfig(s=4, r=12)
    assert changed.role("fc2") == config.default
    assert config.roles == {}  # the original is untouched
    with pytest.raises(ConfigError, match="r must be >= 1"):
        config.with_role("fc1", r=0)


@pytest.mark.parametrize("n_layers, u, r, expected", [(4, 1000, None, 16), (4, 10, None, 10), (4, 1000, 7, 7)])
def test_rank_for(n_layers, u, r, expected):
    assert RoleConfig(s=4, r=r).rank_for(n_layers, u) == expected


@pytest.mark.parametrize("kwargs, message", [
    ({"s": 0}, "s must be >= 1, got 0"),
    ({"s": -4}, "s must be >= 1"),
    ({"s": 2.0}, "s must be an integer, got 2.0"),
    ({"s": "4"}, "s must be an integer"),
    ({"s": True}, "s must be an integer"),
    ({"r": 0}, r"r must be >= 1, got 0\. \(use r=None for full capacity\)"),
    ({"r": -1}, "r must be >= 1, got -1.*r=None"),
    ({"r": 1.5}, "r must be an integer"),
    ({"group_size": 0}, "group_size must be >= 1.*group_size=None"),
    ({"gate": "tanh"}, r"gate must be one of \['gelu', 'none', 'relu', 'silu'\], got 'tanh'"),
    ({"placement": "mid"}, "placement must be one of .*'pre'.*got 'mid'"),
    ({"transpose": 1}, "transpose must be True or False, got 1"),
])
def test_bad_role_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RoleConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"roles": {"fc1": RoleConfig()}, "targets": ("fc2",)}, r"roles \['fc1'\] have overrides but are not in targets"),
    ({"targets": "fc1"}, "targets must be a sequence of role names"),
    ({"targets": ("fc1", 3)}, "targets must be a sequence of role names"),
    ({"gate_init_max": 0.0}, r"gate_init_max must lie in \(0, 0.27\)"),
    ({"gate_init_max": 0.3}, r"gate_init_max must lie in \(0, 0.27\)"),
    ({"gate_init_max": "0.1"}, "gate_init_max"),
    ({"default": {"s": 4}}, "default must be a RoleConfig, got dict"),
    ({"roles": {"fc1": {"s": 4}}}, r"roles\['fc1'\] must be a RoleConfig"),
])
def test_bad_config_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CrispConfig(**kwargs)


def _dict(**changes):
    d = CrispConfig(roles={"fc1": RoleConfig(s=8)}).to_dict()
    d.update(changes)
    return d


@pytest.mark.parametrize("d, message", [
    (_dict(version=CONFIG_VERSION + 1), "config format version 2 is not supported.*upgrade crisp-edge"),
    (_dict(version=0), "config format version 0 is not supported"),
    (_dict(version="1"), "config format version '1' is not supported"),
    (_dict(format="something/else"), "not a crisp-edge config.*something/else"),
    ({k: v for k, v in _dict().items() if k != "format"}, "not a crisp-edge config"),
    (_dict(colour="blue"), r"unknown config keys \['colour'\]"),
    (_dict(default={"s": 4, "rank": 3}), r"unknown role config keys \['rank'\]; known:"),
    (_dict(roles={"fc1": {"s": 0}}), "s must be >= 1"),
    (_dict(roles={"fc1": [4]}), "a role config must be a JSON object"),
    (_dict(default={"gate": "swish"}), "gate must be one of"),
    (_dict(targets=["qkv"]), "have overrides but are not in targets"),
    ([1, 2], "must be a JSON object, got list"),
])
def test_bad_dicts(d, message):
    with pytest.raises(ConfigError, match=message):
        CrispConfig.from_dict(d)
    if isinstance(d, dict):
        with pytest.raises(ConfigError, match=message):
            CrispConfig.from_json(json.dumps(d))


def test_from_json_not_json():
    with pytest.raises(ConfigError, match="not valid JSON"):
        CrispConfig.from_json("{s: 4")


def test_errors_are_value_errors():
    # callers catching ValueError (argparse-style code) also catch configuration errors
    with pytest.raises(ValueError):
        RoleConfig(s=0)


def test_roles_cannot_be_edited_after_validation():
    config = CrispConfig(roles={"fc1": RoleConfig(s=8)})
    with pytest.raises(TypeError, match="read-only"):
        config.roles["fc2"] = RoleConfig(s=3)  # would bypass the config's own checks
    assert config.with_role("fc2", s=2).role("fc2").s == 2 and "fc2" not in config.roles
