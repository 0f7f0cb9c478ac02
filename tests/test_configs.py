"""One strict way to read settings (hafloc.configs): unknown keys are errors that name the key and
the file, older model files with removed keys still load, and `hafloc train`'s flags are
TrainConfig's fields."""

from __future__ import annotations

import argparse

import pytest
import torch

import hafloc.descriptors.network as network
from hafloc.cli import build_parser
from hafloc.cli.train import config_from_args
from hafloc.descriptors.modelfile import load_model, save_model
from hafloc.descriptors.network import GeoLocNet, ModelConfig
from hafloc.errors import InputError
from hafloc.train.config import TrainConfig

# The flags `hafloc train` had when they were a hand-kept table: none may disappear.
OLD_FLAGS = [
    "--method",
    "--dataset",
    "--format",
    "--output",
    "--epochs",
    "--image-size",
    "--backbone",
    "--backbone-weights",
    "--clusters",
    "--proj-dim",
    "--fit-images",
    "--train-stages",
    "--dim",
    "--supervision",
    "--loss",
    "--margin",
    "--num-negatives",
    "--neg-pool",
    "--cache-refresh",
    "--max-queries-per-epoch",
    "--max-val-queries",
    "--val-fraction",
    "--optimizer",
    "--lr",
    "--head-lr",
    "--weight-decay",
    "--batch-size",
    "--patience",
    "--seed",
    "--checkpoint-every",
    "--time-budget",
    "--workers",
    "--cache-images",
]


def _train_parser():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_train_flags_are_the_config_fields_with_help_and_defaults() -> None:
    p = _train_parser()
    flags = {s: a for a in p._actions for s in a.option_strings}
    assert set(OLD_FLAGS) <= set(flags)
    for flag in OLD_FLAGS:
        assert flags[flag].help and len(flags[flag].help) > 10, flag
    assert "(default 5)" in flags["--epochs"].help
    assert "(default 224x320)" in flags["--image-size"].help
    assert "--momentum" not in flags  # a field without a help text stays file-only
    text = p.format_help()
    assert "haf (the paper) or a baseline" in text and "--resume" in text

    args = build_parser().parse_args(
        [
            "train",
            "--dataset",
            "d",
            "--output",
            "o",
            "--epochs",
            "3",
            "--image-size",
            "192x288",
            "--head-lr",
            "0.01",
            "--max-val-queries",
            "7",
        ]
    )
    cfg, resume = config_from_args(args)
    assert (cfg.epochs, cfg.image_size, cfg.head_lr, cfg.max_val_queries, resume) == (3, (192, 288), 0.01, 7, False)
    assert (cfg.lr, cfg.momentum) == (TrainConfig().lr, TrainConfig().momentum)  # untouched defaults


def test_unknown_training_setting_names_the_key_and_the_file(tmp_path) -> None:
    bad = tmp_path / "run.json"
    bad.write_text('{"method": "haf", "epochz": 3}')
    with pytest.raises(InputError) as err:
        TrainConfig.load(bad)
    msg = str(err.value)
    assert "run.json" in msg and "'epochz'" in msg and "\n" not in msg


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = GeoLocNet(ModelConfig.for_method("gem"), pretrained=False).eval()
    return save_model(model, tmp_path_factory.mktemp("m") / "gem.model"), model.fingerprint()


def _with_config(src, dst, edit) -> None:
    payload = torch.load(src, map_location="cpu", weights_only=True)
    edit(payload["config"])
    torch.save(payload, dst)


def test_model_file_with_an_unknown_setting_is_refused(model_file, tmp_path) -> None:
    path, _ = model_file
    _with_config(path, tmp_path / "new.model", lambda c: c.update(turbo=True))
    with pytest.raises(InputError, match=r"new\.model: unknown model setting 'turbo'"):
        load_model(tmp_path / "new.model")
    _with_config(path, tmp_path / "head.model", lambda c: c["head"].update(heads=2))
    with pytest.raises(InputError, match=r"head\.model: unknown head setting 'heads'"):
        load_model(tmp_path / "head.model")


def test_model_file_with_a_removed_setting_still_loads(model_file, tmp_path, monkeypatch) -> None:
    path, fingerprint = model_file
    _with_config(path, tmp_path / "old.model", lambda c: (c.update(pooling="max"), c["head"].update(bn=False)))
    monkeypatch.setattr(network, "LEGACY_KEYS", frozenset({"pooling"}))
    monkeypatch.setattr(network, "LEGACY_HEAD_KEYS", frozenset({"bn"}))
    assert load_model(tmp_path / "old.model").fingerprint() == fingerprint
