from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fedllm_app.config import (
    GROUPS,
    OVERRIDES_KEY,
    RUN_CONFIG_KEYS,
    UNSET,
    ConfigError,
    conf_dir,
    group_options,
    load_config,
    run_config_table,
    user_set_keys,
)

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


# Declared run-config keys (RUN_CONFIG_KEYS) -------------------------------------------------------------------------


def test_pyproject_declares_exactly_the_run_config_keys_of_the_table_all_unset():
    import tomllib

    declared = tomllib.loads((Path(__file__).resolve().parents[3] / "pyproject.toml").read_text())
    app_config = declared["tool"]["flwr"]["app"]["config"]
    assert set(app_config) == {k.name for k in RUN_CONFIG_KEYS} | {OVERRIDES_KEY}
    assert all(value == UNSET for value in app_config.values())


def test_every_run_config_key_sets_an_existing_hydra_key_or_group():
    cfg = load_config({})
    for key in RUN_CONFIG_KEYS:
        assert key.target in GROUPS or OmegaConf.select(cfg, key.target, default=KeyError) is not KeyError, key


def test_the_pyproject_defaults_give_the_yaml_defaults():
    import tomllib

    app_config = tomllib.loads((Path(__file__).resolve().parents[3] / "pyproject.toml").read_text())["tool"]["flwr"]
    assert load_config(app_config["app"]["config"]) == load_config({})


@pytest.mark.parametrize("key", RUN_CONFIG_KEYS, ids=lambda k: k.name)
def test_every_run_config_key_example_reaches_its_hydra_key(key):
    value = tomllib_value(key.example)
    cfg = load_config({key.name: value})
    if key.target in GROUPS:
        assert cfg == load_config({"overrides": f"{key.target}={value}"}) != load_config({})
    else:
        assert OmegaConf.select(cfg, key.target) == value


def tomllib_value(text: str):
    """A value as Flower parses it from --run-config (TOML)."""
    import tomllib

    return tomllib.loads(f"v = {text}")["v"]


def test_run_config_keys_and_overrides_combine():
    cfg = load_config(
        {"num-server-rounds": 5, "strategy": "fedprox", "learning-rate": 1, "overrides": "seed=3 training.grad_accum=2"}
    )
    assert (cfg.num_rounds, cfg.strategy.name, cfg.training.learning_rate) == (5, "fedprox", 1.0)
    assert (cfg.seed, cfg.training.grad_accum) == (3, 2)


def test_an_unset_key_keeps_the_hydra_default():
    assert load_config({"num-server-rounds": UNSET, "seed": UNSET}) == load_config({})


def test_string_values_stay_strings_even_when_they_look_like_numbers_or_null():
    assert load_config({"run-name": "7"}).run_name == "7"
    assert load_config({"output-dir": "null"}).output_dir == "null"
    for path in ("/tmp/a b/it's", 'say "hi", it\'s', "C:\\runs\\", "x\\'y"):
        assert load_config({"output-dir": path}).output_dir == path


def test_a_key_given_twice_with_different_values_names_both():
    with pytest.raises(ConfigError, match=r"num-server-rounds=5 and 'num_rounds=4' in overrides set num_rounds"):
        load_config({"num-server-rounds": 5, "overrides": "num_rounds=4"})
    with pytest.raises(ConfigError, match=r"strategy='fedprox' and 'strategy=fedavg' in overrides"):
        load_config({"strategy": "fedprox", "overrides": "strategy=fedavg"})


def test_a_key_given_twice_with_the_same_value_is_accepted():
    run_config = {
        "num-server-rounds": 4,
        "learning-rate": 2e-3,
        "overrides": "num_rounds=4 training.learning_rate=0.002",
    }
    cfg = load_config(run_config)
    assert (cfg.num_rounds, cfg.training.learning_rate) == (4, 2e-3)


@pytest.mark.parametrize(
    ("name", "value", "pattern"),
    [
        (
            "num-server-rounds",
            "5",
            r"num-server-rounds='5' must be an integer; e.g. --run-config \"num-server-rounds=3\"",
        ),
        ("num-clients", True, r"num-clients=True must be an integer"),
        ("learning-rate", "fast", r"learning-rate='fast' must be a number"),
        ("verbose", 1, r"verbose=1 must be true or false"),
        ("strategy", 3, r"strategy=3 must be a quoted string; e.g. --run-config \"strategy='fedprox'\""),
    ],
)
def test_a_run_config_value_of_the_wrong_type_names_the_key_and_an_example(name, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config({name: value})


def test_bad_values_from_run_config_keys_are_validated_like_overrides():
    with pytest.raises(ConfigError, match=r"unknown strategy 'nope'"):
        load_config({"strategy": "nope"})
    with pytest.raises(ConfigError, match=r"num_rounds=0 must be at least 1"):
        load_config({"num-server-rounds": 0})


def test_unparsable_overrides_fail_with_a_sentence():
    with pytest.raises(ConfigError, match=r"overrides='num_rounds=\[' is not valid Hydra override syntax"):
        load_config({"overrides": "num_rounds=["})


def test_user_set_keys_come_from_run_config_keys_and_overrides():
    run_config = {"num-clients": UNSET, "seed": 3, "overrides": "+sample_clients=2 model=tiny"}
    assert user_set_keys(run_config) == {"seed", "sample_clients", "model"}
    assert user_set_keys({}) == set()


def test_sample_clients_follows_num_clients_unless_set():
    assert load_config({"num-clients": 2}).sample_clients == 2
    assert load_config({"num-clients": 6, "sample-clients": 3}).sample_clients == 3


def test_readme_options_table_is_the_run_config_table():
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    start, end = (
        "<!-- run-config-keys: generated by fedllm_app.config.run_config_table -->\n",
        "\n<!-- /run-config-keys -->",
    )
    assert start in readme and end in readme
    assert readme.split(start, 1)[1].split(end, 1)[0] == run_config_table(), "paste run_config_table() into README"
