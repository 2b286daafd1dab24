"""Config files and overrides: every bad value is a one-line error naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreamddp.training.config import load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.steps >= 1 and cfg.model_name in ("gpt", "llama", "resnet", "hf")


def test_overrides_are_typed():
    cfg = load_config(
        CONFIGS[0],
        ["train.steps=7", "train.link=100mbit,20ms", "train.algorithm=ssgd", "model.n_layer=1", "train.lr=1"],
    )
    assert cfg.train.steps == 7 and cfg.train.link_spec.bandwidth_bps == 1e8
    assert cfg.train.algorithm == "ssgd" and cfg.model["n_layer"] == 1 and cfg.train.lr == 1


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.period=0", "train.period must be an integer >= 1 or 'auto', got 0"),
        ("train.algorithm=sync", "train.algorithm 'sync' is unknown"),
        ("train.link=100mbit,20", "malformed link '100mbit,20'"),
        ("train.lr=-1", "train.lr must be a number > 0, got -1"),
        ("train.steps=ten", "config key train.steps must be int, got 'ten'"),
        ("train.speed=3", "config key train.speed is unknown"),
        ("data.name=imagenet", "data.name 'imagenet' is unknown"),
        ("model.n_head=3", "n_head"),
        ("model.name=bert", "unknown model 'bert'"),
        ("trian.steps=3", "config section [trian] is unknown"),
        ("steps=3", "is not of the form section.key=value"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ValueError) as info:
        load_config(CONFIGS[0], [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1")
    with pytest.raises(ValueError, match="is not valid TOML"):
        load_config(bad)


def test_every_configurable_algorithm_has_a_strategy():
    """config.ALGORITHMS is the one list: the trainer must build a strategy for each name, and no other."""
    from dreamddp.training.config import ALGORITHMS
    from dreamddp.training.strategies import _STRATEGIES, SCHEDULED

    assert sorted([*_STRATEGIES, *SCHEDULED]) == sorted(ALGORITHMS)
