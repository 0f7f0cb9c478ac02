"""Training: outputs, a real optimisation step, GPS and label supervision, exact resume after
SIGKILL, torchrun with two processes. Tiny images and subsets keep it to about two minutes."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hafloc.descriptors.extract import Extractor
from hafloc.descriptors.modelfile import load_model
from hafloc.train.config import TrainConfig
from hafloc.train.loop import (
    build_model,
    build_optimizer,
    freeze_backbone,
    load_checkpoint,
    set_train_mode,
    train,
    tuple_loss,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = "64x96"
TINY = dict(
    image_size=SIZE,
    clusters=8,
    proj_dim=32,
    fit_images=20,
    num_negatives=3,
    batch_size=4,
    cache_refresh=16,
    neg_pool=50,
    progress=False,
)


def make_label_subset(shared: Path, out: Path, labels: int = 4, per_label: int = 10, queries: int = 2) -> Path:
    """A label-CSV copy of ie_tower_floors with ``labels`` floors x ``per_label`` gallery images."""
    src = shared / "ie_tower_floors"
    rows = list(csv.DictReader(open(src / "dataset.csv", encoding="utf-8")))
    chosen = sorted({r["label"] for r in rows})[:labels]
    sel = []
    for lab in chosen:
        sel += [r for r in rows if r["label"] == lab and r["split"] == "gallery"][:per_label]
        sel += [r for r in rows if r["label"] == lab and r["split"] == "query"][:queries]
    for r in sel:
        dst = out / "images" / r["image"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "images" / r["image"], dst)
    with open(out / "dataset.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["image", "label", "split"])
        w.writeheader()
        for r in sel:
            w.writerow({k: r[k] for k in ("image", "label", "split")})
    return out


@pytest.fixture(scope="module")
def floors(shared_data, tmp_path_factory) -> Path:
    return make_label_subset(shared_data, tmp_path_factory.mktemp("floors"))


@pytest.fixture(scope="module")
def label_run(floors, tmp_path_factory) -> tuple[TrainConfig, dict]:
    out = tmp_path_factory.mktemp("label_run")
    cfg = TrainConfig(method="haf", dataset=str(floors), output=str(out), epochs=2, dim=16, **TINY)
    return cfg, train(cfg)


def test_label_run_writes_usable_outputs(label_run, floors):
    cfg, summary = label_run
    out = Path(cfg.output)
    for name in ("best.model", "last.ckpt", "history.csv", "history.png", "config.json"):
        assert (out / name).is_file(), name
    assert summary["supervision"] == "labels" and summary["loss"] == "dd"
    assert summary["iterations"] == 2 * 8  # 40 gallery images, 8 held out for val: 32 queries / 4 per batch
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]  # untrained baseline + 2 epochs
    assert rows[0]["loss"] == "" and float(rows[1]["loss"]) >= 0
    assert all(0 <= float(r["val_recall@5"]) <= 100 for r in rows)
    assert TrainConfig.load(out / "config.json") == cfg
    model = load_model(out / "best.model")
    assert model.whitening.dim == 16
    best_row = max(rows, key=lambda r: float(r["val_recall@5"]))
    assert float(best_row["val_recall@5"]) == summary["best_val_recall@5"]
    img = next((floors / "images").rglob("*.jpg"))
    res = Extractor(model, batch_size=2).extract_paths([img], progress=False)
    assert res.descriptors.shape == (1, 16)
    assert abs(np.linalg.norm(res.descriptors[0]) - 1) < 1e-4
    ckpt = load_checkpoint(out / "last.ckpt")
    assert ckpt["progress"]["done"] and ckpt["progress"]["epoch"] == 2


def test_loss_decreases_on_a_fixed_batch(floors):
    paths = sorted((floors / "images").rglob("*.jpg"))
    cfg = TrainConfig(method="haf", dataset=str(floors), output="unused", lr=1e-3, **TINY)
    torch.manual_seed(0)
    model, _ = build_model(cfg, paths[:12], progress=False)
    frozen = freeze_backbone(model, 1)
    opt = build_optimizer(model, cfg)
    by_label: dict[str, list[Path]] = {}
    for p in paths:
        by_label.setdefault(p.parent.name, []).append(p)
    labs = sorted(by_label)
    from hafloc.images.io import load_image, to_tensor

    def t(p):
        return to_tensor(load_image(p), size=(64, 96))

    # 2 tuples: (query, same floor, 3 other floors)
    qs = [by_label[labs[0]][0], by_label[labs[1]][0]]
    ps = [by_label[labs[0]][5], by_label[labs[1]][5]]
    ns = [
        by_label[labs[1]][1],
        by_label[labs[2]][1],
        by_label[labs[3]][1],
        by_label[labs[0]][1],
        by_label[labs[2]][2],
        by_label[labs[3]][2],
    ]
    x = torch.stack([t(p) for p in qs + ps + ns])
    for loss_name in ("dd", "triplet"):
        losses = []
        for _ in range(6):
            set_train_mode(model, frozen)
            opt.zero_grad()
            loss = tuple_loss(model, x, 2, 3, loss_name, margin=0.5)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert losses[0] > 0
        assert losses[-1] < 0.8 * losses[0], (loss_name, losses)
    # frozen stages did not move: their BatchNorm stayed in eval mode and got no gradient
    assert all(not p.requires_grad for g in frozen for p in g.parameters())


def test_gps_supervision_on_at_folders(tmp_path):
    from hafloc.synth import SyntheticCityConfig, generate_city

    root = generate_city(
        tmp_path / "city",
        SyntheticCityConfig(places_per_split={"train": 6, "val": 3, "test": 3}, image_size=(64, 96)),
        progress=False,
    )
    cfg = TrainConfig(method="netvlad", dataset=str(root), output=str(tmp_path / "out"), epochs=1, **TINY)
    summary = train(cfg)
    assert summary["supervision"] == "gps" and summary["loss"] == "triplet"
    assert summary["dropped_queries"] == 0  # every synthetic query has a database image within 10 m
    assert summary["iterations"] == 2  # 6 training queries in batches of 4
    assert load_model(tmp_path / "out" / "best.model").config.method == "netvlad"


def test_two_datasets_train_together_and_validate_each(tmp_path, caplog):
    from hafloc.synth import SyntheticCityConfig, generate_city

    roots = [
        generate_city(
            tmp_path / f"city{i}",
            SyntheticCityConfig(places_per_split={"train": 6, "val": 3, "test": 3}, image_size=(64, 96), seed=i),
            progress=False,
        )
        for i in range(2)
    ]
    cfg = TrainConfig(
        method="netvlad",
        dataset=",".join(map(str, roots)),
        output=str(tmp_path / "out"),
        epochs=2,
        select="recall@1+5",
        **TINY,
    )
    summary = train(cfg)
    assert summary["iterations"] == 2 * 3  # 12 training queries (6 per set) in batches of 4, two epochs
    names = [f"city{i}-val" for i in range(2)]
    for row in summary["history"]:
        per_set = [row[f"val_{n}/recall@5"] for n in names]
        assert row["val_recall@5"] == pytest.approx(np.mean(per_set), abs=1e-3)  # the mean of the two sets
    with open(tmp_path / "out" / "history.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert all(float(row[f"val_{n}/recall@1"]) >= 0 for row in table for n in names)

    # the selected model has the best mean (R@1 + R@5) / 2 among the epochs with no set below its start
    def score(row, n=None):
        pre = f"val_{n}/" if n else "val_"
        return (row[pre + "recall@1"] + row[pre + "recall@5"]) / 2

    start = summary["history"][0]
    eligible = [r for r in summary["history"] if all(score(r, n) >= score(start, n) - 1e-3 for n in names)]
    chosen = next(r for r in summary["history"] if r["epoch"] == summary["best_epoch"])
    assert chosen in eligible and score(chosen) == pytest.approx(max(score(r) for r in eligible), abs=1e-3)
    assert summary["select"] == "recall@1+5"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hafloc", "train", *args]


def _tiny_flags(dataset: Path, out: Path, epochs: int = 3) -> list[str]:
    return [
        "--method",
        "haf",
        "--dataset",
        str(dataset),
        "--output",
        str(out),
        "--epochs",
        str(epochs),
        "--image-size",
        SIZE,
        "--clusters",
        "8",
        "--proj-dim",
        "32",
        "--fit-images",
        "20",
        "--num-negatives",
        "3",
        "--batch-size",
        "4",
        "--cache-refresh",
        "8",
        "--neg-pool",
        "50",
        "--checkpoint-every",
        "2",
        "--patience",
        "0",
        "--lr",
        "1e-3",
        "--no-progress",
    ]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def test_kill_then_resume_matches_uninterrupted_run(floors, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    done = subprocess.run(_cli(*_tiny_flags(floors, ref)), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    proc = subprocess.Popen(
        _cli(*_tiny_flags(floors, cut)), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    killed_at, initial = None, None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            ck = cut / "last.ckpt"
            if ck.exists():
                try:
                    payload = load_checkpoint(ck)
                    it = payload["progress"]["iteration"]
                except Exception:  # renamed away while we read it
                    continue
                if it == 0 and initial is None:
                    initial = payload["model"]
                if it >= 4:  # a mid-epoch checkpoint of epoch 1 exists
                    proc.send_signal(signal.SIGKILL)
                    killed_at = it
                    break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert killed_at is not None and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    state = load_checkpoint(cut / "last.ckpt")["progress"]
    assert not state["done"]
    resumed = subprocess.run(
        _cli("--resume", str(cut), "--no-progress"), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_checkpoint(ref / "last.ckpt"), load_checkpoint(cut / "last.ckpt")
    assert a["progress"]["iteration"] == b["progress"]["iteration"] > killed_at
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-5), k
    ha, hb = a["progress"]["history"], b["progress"]["history"]
    assert len(ha) == len(hb) == 4
    for ra, rb in zip(ha, hb):
        for key in ("epoch", "loss", "val_recall@1", "val_recall@5", "val_recall@10"):
            va, vb = ra.get(key), rb.get(key)
            assert (va is None and vb is None) or abs(va - vb) < 1e-4, (key, ra, rb)
    # training moved the weights, so equal final weights are not a vacuous check
    assert initial is not None
    assert any(
        not torch.allclose(initial[k].float(), v.float(), atol=1e-4)
        for k, v in a["model"].items()
        if v.dtype.is_floating_point
    )


def test_torchrun_two_processes_cpu(floors, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "hafloc",
        "train",
        *_tiny_flags(floors, out, epochs=1),
    ]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    try:
        assert res.stdout.count('"output"') == 1  # only rank 0 reports
        rows = list(csv.DictReader(open(out / "history.csv")))
        assert [r["epoch"] for r in rows] == ["0", "1"]
        ck = load_checkpoint(out / "last.ckpt")
        assert ck["progress"]["done"] and ck["progress"]["iteration"] == 8  # 32 queries / global batch 4
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
            "best.model",
            "config.json",
            "history.csv",
            "history.png",
            "last.ckpt",
        ]
        load_model(out / "best.model")
    except Exception as err:  # show what the two ranks said
        raise AssertionError(
            f"{err!r}\n--- stdout ---\n{res.stdout[-2000:]}\n--- stderr ---\n{res.stderr[-3000:]}"
        ) from err


def test_config_file_flags_and_resume_guard(floors, tmp_path):
    from hafloc.cli import build_parser
    from hafloc.cli.train import config_from_args
    from hafloc.errors import HaflocError, InputError

    cfg_file = tmp_path / "c.json"
    TrainConfig(method="crn", dataset=str(floors), output=str(tmp_path / "o"), epochs=7, lr=0.5).save(cfg_file)
    args = build_parser().parse_args(["train", "--config", str(cfg_file), "--lr", "0.01"])
    cfg, resume = config_from_args(args)
    assert (cfg.method, cfg.epochs, cfg.lr, resume) == ("crn", 7, 0.01, False)
    (tmp_path / "o").mkdir()
    cfg.save(tmp_path / "o" / "config.json")
    with pytest.raises(HaflocError, match="cannot change method"):
        config_from_args(build_parser().parse_args(["train", "--resume", str(tmp_path / "o"), "--method", "haf"]))
    bad = tmp_path / "bad.json"
    bad.write_text('{"method": "haf", "nonsense": 1}')
    with pytest.raises(InputError, match="nonsense"):
        config_from_args(build_parser().parse_args(["train", "--config", str(bad)]))
    with pytest.raises(HaflocError, match="look like 224x320"):
        TrainConfig(image_size="100by100")


def test_image_size_is_rounded_to_multiples_of_32_with_a_note(floors, tmp_path, caplog):
    from hafloc.cli import build_parser
    from hafloc.cli.train import config_from_args
    from hafloc.images.io import target_size

    args = build_parser().parse_args(
        ["train", "--dataset", str(floors), "--output", str(tmp_path / "o"), "--image-size", "240x330"]
    )
    with caplog.at_level("INFO", logger="hafloc.train.config"):
        cfg, _ = config_from_args(args)
    assert cfg.image_size == target_size(330, 240, max_side=None) == (256, 320)  # extraction's rounding
    notes = [r.getMessage() for r in caplog.records if r.name == "hafloc.train.config"]
    assert notes == ["image size 240x330 rounded to 256x320 (the networks need sides that are multiples of 32)"]
    caplog.clear()
    assert TrainConfig(image_size="224x320").image_size == (224, 320) and not caplog.records  # silent when exact
    assert TrainConfig(image_size="20x40").image_size == (32, 32)


def test_unreadable_training_image_is_skipped_and_reported(floors, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(floors, ds)
    victim = sorted((ds / "images").rglob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG
    cfg = TrainConfig(method="gem", dataset=str(ds), output=str(tmp_path / "o"), epochs=1, **TINY)
    summary = train(cfg)
    assert [Path(p).name for p in summary["skipped_images"]] == [victim.name]
    assert "truncated" in next(iter(summary["skipped_images"].values())) or "corrupt" in next(
        iter(summary["skipped_images"].values())
    )
    assert (tmp_path / "o" / "best.model").is_file()


def test_time_budget_stops_cleanly_with_outputs(floors, tmp_path):
    cfg = TrainConfig(
        method="gem", dataset=str(floors), output=str(tmp_path / "o"), epochs=50, time_budget=0.001, **TINY
    )
    summary = train(cfg)
    assert summary["stopped_for_time"] and summary["epochs_done"] == 0
    assert (tmp_path / "o" / "best.model").is_file() and (tmp_path / "o" / "history.csv").is_file()
    assert not load_checkpoint(tmp_path / "o" / "last.ckpt")["progress"]["done"]  # resumable


def test_head_variant_settings_reach_the_trained_model(floors, tmp_path):
    """--levels / --attention (the ablation's HAF variants) go through config.json into best.model."""
    from hafloc.cli import build_parser
    from hafloc.cli.train import config_from_args
    from hafloc.errors import HaflocError

    out = tmp_path / "o"
    argv = [
        "train",
        "--dataset",
        str(floors),
        "--output",
        str(out),
        "--levels",
        "low,high",
        "--attention",
        "off",
        "--epochs",
        "1",
        "--image-size",
        SIZE,
        "--clusters",
        "8",
        "--proj-dim",
        "32",
        "--fit-images",
        "20",
        "--num-negatives",
        "3",
        "--cache-refresh",
        "16",
        "--neg-pool",
        "50",
        "--no-progress",
    ]
    cfg, _ = config_from_args(build_parser().parse_args(argv))
    assert (cfg.levels, cfg.attention) == (("low", "high"), False)
    train(cfg)
    assert TrainConfig.load(out / "config.json").levels == ("low", "high")
    model = load_model(out / "best.model")
    assert model.config.head.levels == ("low", "high") and model.config.head.attention is False
    assert len(model.head.attn) == 0 and model.out_dim == 2 * 8 * 32
    assert model.head.fusion_weights().shape == (2,)
    with pytest.raises(HaflocError, match="no levels setting"):
        TrainConfig(method="gem", dataset="d", output="o", levels=("low",)).validate()
    with pytest.raises(SystemExit):  # argparse: "invalid on/off value"
        build_parser().parse_args(["train", "--attention", "maybe"])
