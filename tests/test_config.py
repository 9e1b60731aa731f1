"""YAML configs: strict keys and types, with errors that name the key and the file."""

from __future__ import annotations

import pytest

from fa3dist.config import ConfigError, load_config
from fa3dist.demo import DemoConfig


def test_shipped_demo_config_loads():
    cfg = load_config(DemoConfig, "configs/demo.yaml")
    assert cfg == DemoConfig()


def test_overrides_and_values_apply(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text("seq_len: 64\nheads: 4\n")
    cfg = load_config(DemoConfig, path, ["kv_heads=1", "causal=false"], world_size=2)
    assert (cfg.seq_len, cfg.heads, cfg.kv_heads, cfg.causal, cfg.world_size) == (64, 4, 1, False, 2)


@pytest.mark.parametrize("text,match", [
    ("seq_lenn: 64\n", r"unknown key\(s\) seq_lenn"),
    ("seq_len: sixty\n", r"key 'seq_len': expected int, got 'sixty'"),
    ("causal: 1\n", r"key 'causal': expected bool"),
    ("layout: striped\n", r"key 'layout' must be one of"),
    ("heads: 0\n", r"key 'heads' must be at least 1"),
    ("- 1\n- 2\n", r"expected a mapping"),
])
def test_bad_config_names_key_and_file(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(DemoConfig, path)
    assert str(path) in str(info.value)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DemoConfig, "configs/nope.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(DemoConfig, None, ["seq_len"])


def test_a_folder_given_as_config_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"config configs is a folder; give one YAML file \(YAML files there: "
                                          r"configs/bench_kernel.yaml"):
        load_config(DemoConfig, "configs")


def test_a_drill_that_would_never_fail_is_refused():
    from fa3dist.check import CheckConfig

    with pytest.raises(ConfigError, match=r"key 'fail_round' \(5\) must be below 'rounds' \(4\)"):
        load_config(CheckConfig, None, ["rounds=4", "fail_rank=0"])
    with pytest.raises(ConfigError, match="key 'fail_mode' must be one of raise, exit, kill, hang"):
        load_config(CheckConfig, None, ["fail_mode=explode"])
    with pytest.raises(ConfigError, match=r"heads \(6\) must be a multiple of kv_heads \(4\)"):
        load_config(DemoConfig, None, ["heads=6", "kv_heads=4"])
