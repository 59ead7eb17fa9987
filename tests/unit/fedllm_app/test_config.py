from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fedllm_app.config import ConfigError, conf_dir, group_options, load_config

CONF = conf_dir()
GROUP_FILES = sorted(p for p in CONF.rglob("*.yaml") if p.parent != CONF)


def test_every_group_file_is_found():
    assert {p.parent.name for p in GROUP_FILES} >= {"model", "dataset", "strategy", "training"}
    assert len(GROUP_FILES) >= 6


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: str(p.relative_to(CONF)))
def test_every_conf_file_composes(path: Path):
    group = str(path.parent.relative_to(CONF))
    cfg = load_config({"overrides": f"{group}={path.stem}"})
    assert cfg[group.split("/")[0]] is not None


def test_root_config_composes_with_hydra_directly():
    with initialize_config_dir(version_base=None, config_dir=str(CONF)):
        cfg = compose(config_name="config")
    assert cfg.strategy.name == "fedavg"


def test_run_config_overrides_reach_hydra():
    cfg = load_config({"overrides": "strategy=fedavg model=tiny seed=7 num_rounds=3"})
    assert (cfg.seed, cfg.num_rounds, cfg.model.name) == (7, 3, "builtin:tiny")


def test_empty_run_config_gives_the_yaml_defaults():
    with initialize_config_dir(version_base=None, config_dir=str(CONF)):
        expected = compose(config_name="config")
    assert load_config({}) == expected
    assert load_config({"overrides": ""}) == expected


def test_unknown_strategy_lists_the_choices():
    with pytest.raises(ConfigError, match=r"unknown strategy 'nope'.*fedavg"):
        load_config({"overrides": "strategy=nope"})


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'traning'") as err:
        load_config({"overrides": "traning.lr=1"})
    assert "num_rounds" in str(err.value)


def test_unknown_nested_key_lists_the_group_keys():
    with pytest.raises(ConfigError, match=r"'training\.lr'.*valid keys in 'training'.*learning_rate"):
        load_config({"overrides": "training.lr=1"})


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("sample_clients=5", r"sample_clients=5 must be between 1 and num_clients=4"),
        ("num_rounds=0", r"num_rounds=0 must be at least 1"),
        ("training.template=dolly", r"unknown template 'dolly'.*alpaca, vicuna, chat"),
        ("model.name=/does/not/exist", r"model.name='/does/not/exist' is not a directory"),
        ("training.learning_rate=0", r"training.learning_rate=0"),
        ("model.quantization=3bit", r"model.quantization='3bit'"),
        ("baseline=global", r"baseline='global'"),
    ],
)
def test_bad_values_fail_with_a_message_naming_them(override: str, pattern: str):
    with pytest.raises(ConfigError, match=pattern):
        load_config({"overrides": override})


def test_group_options_are_yaml_stems():
    assert "fedavg" in group_options("strategy")
    assert "tiny" in group_options("model")
