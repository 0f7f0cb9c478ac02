"""The frozen-trunk training cache: split passes equal the full pass, cached training equals
uncached training on real photos, the key follows the frozen weights / size / files, a killed
build resumes, and two builders at once share the work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hafloc.backbones import create_backbone
from hafloc.backbones.superpoint import SuperPointNet
from hafloc.descriptors.network import GeoLocNet, ModelConfig
from hafloc.images.io import load_image, to_tensor
from hafloc.train.config import TrainConfig
from hafloc.train.loop import Trainer, freeze_backbone
from hafloc.train.trunk_cache import TrunkCache, frozen_groups
from test_train import TINY, make_label_subset

REPO = Path(__file__).resolve().parents[1]
SIZE = (64, 96)


@pytest.fixture(scope="module")
def floors(shared_data, tmp_path_factory) -> Path:
    return make_label_subset(shared_data, tmp_path_factory.mktemp("floors"))


@pytest.fixture(scope="module")
def photos(shared_data) -> list[Path]:
    return sorted((shared_data / "ie_tower_floors" / "images").rglob("*.jpg"))[::97][:12]


@pytest.fixture(scope="module")
def haf() -> GeoLocNet:
    cfg = ModelConfig.for_method("haf", num_clusters=8, proj_dim=32)
    torch.manual_seed(0)
    model = GeoLocNet(cfg, pretrained=True)
    freeze_backbone(model, 1)
    return model.eval()


def _loader(paths: list[Path], size: tuple[int, int] = SIZE):
    return lambda i: to_tensor(load_image(paths[i]), size=size)


@pytest.mark.parametrize("name", ["efficientnet-lite0", "vgg16", "superpoint"])
def test_split_pass_equals_full_pass(name, photos):
    torch.manual_seed(0)
    bb = SuperPointNet() if name == "superpoint" else create_backbone(name, pretrained=name != "vgg16")
    bb.eval()
    x = torch.stack([_loader(photos)(i) for i in range(2)])
    with torch.no_grad():
        ref = bb(x)
        for k in range(len(bb.trainable_groups()) + 1):
            out = bb.forward_from(bb.forward_until(x, k), k)
            assert set(out) == set(ref)
            for lv in ref:
                assert torch.equal(out[lv], ref[lv]), (name, k, lv)


def _run(floors: Path, out: Path, trunk_cache: str) -> tuple[dict, dict, dict]:
    # refreshes every 4 queries: mining reads descriptors computed through the cache too
    cfg = TrainConfig(
        method="haf",
        dataset=str(floors),
        output=str(out),
        epochs=1,
        patience=0,
        trunk_cache=trunk_cache,
        **{**TINY, "fit_images": 8, "cache_refresh": 4, "max_queries_per_epoch": 12},
    )
    tr = Trainer(cfg)
    init = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    summary = tr.run()
    return summary, {k: v.detach().clone() for k, v in tr.model.state_dict().items()}, init


def test_cached_training_run_equals_uncached_run(floors, tmp_path):
    """float32 storage through the whole loop (mining, steps, validation): the same run (up to the
    last bits a convolution's batch size may change)."""
    ref, w_ref, w_init = _run(floors, tmp_path / "ref", "no")
    exact, w_exact, _ = _run(floors, tmp_path / "f32", "float32")
    assert not ref["trunk_cache"]["enabled"]
    assert exact["trunk_cache"]["enabled"] and exact["trunk_cache"]["computed"] == 40
    assert ref["iterations"] == exact["iterations"] == 3
    assert np.allclose(
        [h["loss"] for h in exact["history"][1:]], [h["loss"] for h in ref["history"][1:]], atol=1e-6, rtol=0
    )
    assert [h["val_recall@5"] for h in exact["history"]] == [h["val_recall@5"] for h in ref["history"]]
    for k, v in w_ref.items():
        assert torch.allclose(v.float(), w_exact[k].float(), atol=1e-6, rtol=0), k
    # training moved the weights well beyond that: equal weights are not a vacuous check
    assert max(float((w_ref[k] - w_init[k]).abs().max()) for k in w_ref if k.startswith("head")) > 1e-5


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_float16_cache_steps_match_uncached(photos, optimizer, tmp_path):
    """The default float16 storage: three steps on a fixed batch of real photos, losses to 1e-4;
    with SGD the head weights too. (Adam's first steps are lr x sign(gradient): a rounding can flip
    the step of a near-zero gradient, so its weights agree to 2 x lr per step, not 1e-4.)"""
    from hafloc.train.loop import build_model, build_optimizer, set_train_mode, tuple_loss
    from hafloc.train.trunk_cache import CachedTrunkNet

    cfg = TrainConfig(
        method="haf", dataset="-", output="-", image_size=SIZE, clusters=8, proj_dim=32, optimizer=optimizer, lr=1e-3
    )
    torch.manual_seed(0)
    base, _ = build_model(cfg, None, progress=False)
    paths = photos[:12] + photos[:2]  # 2 tuples x (query + positive + 5 negatives)
    x = torch.stack([_loader(paths)(i) for i in range(len(paths))])
    runs = []
    for cached in (False, True):
        model = GeoLocNet(base.config, pretrained=False)
        model.load_state_dict(base.state_dict())
        frozen = freeze_backbone(model, 1)
        opt = build_optimizer(model, cfg)
        net, batch = model, x
        if cached:
            cache = TrunkCache(tmp_path, model, frozen_groups(model, 1), SIZE)
            cache.build(paths, _loader(paths))
            net, batch = CachedTrunkNet(model, cache.stop), cache.batch(range(len(paths)))
        losses = []
        for _ in range(3):
            set_train_mode(model, frozen)
            opt.zero_grad()
            loss = tuple_loss(net, batch, 2, 5, "dd", None)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        runs.append((losses, {k: v.detach().clone() for k, v in model.head.state_dict().items()}))
    (l_ref, w_ref), (l_half, w_half) = runs
    assert np.allclose(l_half, l_ref, atol=1e-4, rtol=0) and l_ref[0] != l_ref[-1]
    if optimizer == "sgd":
        for k, v in w_ref.items():
            assert torch.allclose(v, w_half[k], atol=1e-4, rtol=0), k


def test_key_follows_size_weights_and_files(haf, photos, tmp_path):
    stop = frozen_groups(haf, 1)
    paths = [tmp_path / f"img{i}.jpg" for i in range(4)]
    for src, dst in zip(photos, paths):
        dst.write_bytes(src.read_bytes())
    a = TrunkCache(tmp_path / "c", haf, stop, SIZE)
    assert a.build(paths, _loader(paths))["computed"] == 4
    # the same model again: nothing to compute, the same rows
    b = TrunkCache(tmp_path / "c", haf, stop, SIZE)
    assert b.folder == a.folder and b.build(paths, _loader(paths))["computed"] == 0
    sa, sb = a.batch([0, 3]), b.batch([0, 3])
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the stored state is the frozen groups' output (float16-rounded) of that image
    with torch.no_grad():
        direct = haf.backbone.forward_until(_loader(paths)(3)[None], stop)
    assert torch.allclose(sa["mid"][1], direct["mid"][0], rtol=1e-3, atol=1e-3)
    assert torch.equal(sa["carry"], sa["mid"])
    # another size: another folder
    c = TrunkCache(tmp_path / "c", haf, stop, (96, 128))
    assert c.folder != a.folder and c.build(paths, _loader(paths, (96, 128)))["computed"] == 4
    # a trainable weight changed: same key; a frozen one changed: new key
    groups = haf.backbone.trainable_groups()
    p_train = next(groups[-1].parameters())
    p_frozen = next(groups[0].parameters())
    saved = [p_train.detach().clone(), p_frozen.detach().clone()]
    with torch.no_grad():
        p_train.add_(1.0)
        assert TrunkCache(tmp_path / "c", haf, stop, SIZE).folder == a.folder
        p_train.copy_(saved[0])
        p_frozen.add_(1e-3)
        changed = TrunkCache(tmp_path / "c", haf, stop, SIZE).folder
        p_frozen.copy_(saved[1])
    assert changed != a.folder
    # one more frozen group: new key
    assert TrunkCache(tmp_path / "c", haf, stop - 1, SIZE).folder != a.folder
    # a rewritten image is computed again; the others are kept
    paths[1].write_bytes(photos[5].read_bytes())
    os.utime(paths[1], ns=(time.time_ns(), time.time_ns() + 10**9))
    d = TrunkCache(tmp_path / "c", haf, stop, SIZE)
    assert d.build(paths, _loader(paths))["computed"] == 1
    assert not torch.equal(d.batch([1])["mid"], sa["mid"][:1])


def test_a_level_ablation_reads_the_cache_of_every_level(haf, photos, tmp_path):
    """A model on fewer levels trains from the full model's cache when one exists (the same state
    as from a cache of its own, nothing computed again), and keeps its own cache otherwise."""
    stop = frozen_groups(haf, 1)
    low = GeoLocNet(ModelConfig.for_method("haf", levels=("low",), num_clusters=8, proj_dim=32), pretrained=True)
    freeze_backbone(low, 1)
    paths = photos[:4]
    own = TrunkCache(tmp_path / "own", low, stop, SIZE)
    assert own.keep == {"low"} and own.build(paths, _loader(paths))["computed"] == 4
    full = TrunkCache(tmp_path / "every", haf, stop, SIZE)
    assert full.build(paths, _loader(paths))["computed"] == 4
    reader = TrunkCache(tmp_path / "every", low, stop, SIZE)
    assert reader.folder == full.folder and reader.build(paths, _loader(paths))["computed"] == 0
    got, want = reader.batch(range(4)), own.batch(range(4))
    assert set(got) == set(want) == {"low", "carry"}  # the mid tap, stored for the full model, is not passed on
    assert all(torch.equal(got[k], want[k]) for k in want)
    # its own cache, once it has one, stays its own (a later cache of every level changes nothing)
    TrunkCache(tmp_path / "own", haf, stop, SIZE).build(paths, _loader(paths))
    assert TrunkCache(tmp_path / "own", low, stop, SIZE).folder == own.folder != full.folder


BUILDER = """
import sys, time, torch
from pathlib import Path
from hafloc.descriptors.network import GeoLocNet, ModelConfig
from hafloc.images.io import load_image, to_tensor
from hafloc.train.loop import freeze_backbone
from hafloc.train.trunk_cache import TrunkCache, frozen_groups
root, delay, *paths = sys.argv[1:]
model = GeoLocNet(ModelConfig.for_method("haf", num_clusters=8, proj_dim=32), pretrained=True)
freeze_backbone(model, 1)
def load(i):
    time.sleep(float(delay))  # a slow disk: the build takes long enough to be interrupted
    return to_tensor(load_image(paths[i]), size=(64, 96))
cache = TrunkCache(root, model, frozen_groups(model, 1), (64, 96), shard_rows=2)
print(cache.build(paths, load, batch_size=2, workers=1, progress=False)["computed"], flush=True)
"""


def _builder(root: Path, paths: list[Path], delay: float) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-c", BUILDER, str(root), str(delay), *map(str, paths)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_killed_build_resumes_and_concurrent_builders_share(haf, photos, tmp_path):
    stop = frozen_groups(haf, 1)
    root = tmp_path / "c"
    proc = _builder(root, photos, 0.3)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if list(root.glob("*/shard-000001.json")):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the build ended before it could be killed"
    cache = TrunkCache(root, haf, stop, SIZE)
    committed = len(cache._index())
    assert 2 <= committed < len(photos)
    assert cache.build(photos, _loader(photos))["computed"] == len(photos) - committed
    assert not list(cache.folder.glob(".*partial*"))
    fresh = TrunkCache(tmp_path / "fresh", haf, stop, SIZE)
    fresh.build(photos, _loader(photos))
    ids = list(range(len(photos)))
    got, want = cache.batch(ids), fresh.batch(ids)  # (other batch sizes and threads: float16 roundings)
    assert all(torch.allclose(got[k], want[k], rtol=1e-3, atol=1e-3) for k in want)
    # two builders at once on an empty folder: every image computed exactly once between them
    both = [_builder(tmp_path / "shared", photos[:6], 0.05) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in both]
    assert [p.returncode for p in both] == [0, 0], [o[1][-500:] for o in outs]
    assert sorted(int(o[0].split()[-1]) for o in outs) == [0, 6]
    shared = TrunkCache(tmp_path / "shared", haf, stop, SIZE)
    assert len(shared._index()) == 6 and shared.build(photos[:6], _loader(photos))["computed"] == 0
