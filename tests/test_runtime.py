"""The one runtime (hafloc.descriptors.runtime): runners leave the caller's model as they found it,
the batching iterator groups by size without losing or reordering items, and unreadable images
come back as Skipped in their place."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hafloc.descriptors.network import GeoLocNet, ModelConfig
from hafloc.descriptors.runtime import Batch, Skipped, TorchRunner, make_runner, run_batches
from hafloc.errors import HaflocError, InputError
from hafloc.images.io import load_image, to_tensor


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GeoLocNet(ModelConfig.for_method("haf", num_clusters=4), pretrained=False)


@pytest.fixture(scope="module")
def photos(shared_data):
    return sorted((shared_data / "landmarks_mini" / "images").glob("*.jpg"))[:5]


def test_torch_runner_keeps_the_callers_training_flag_and_threads(model):
    threads = torch.get_num_threads()
    model.train()
    run = TorchRunner(model)
    x = torch.rand(2, 3, 64, 96)
    out = run(x)
    assert model.training and all(m.training for m in model.modules())  # put back after the call
    assert torch.get_num_threads() == threads
    with torch.inference_mode():
        ref = model.eval()(x)
    model.train()
    # evaluation mode inside the call: the same numbers as an eval-mode forward pass
    assert np.abs(out["descriptor"] - ref["descriptor"].numpy()).max() < 1e-5
    assert out["attention"].keys() == ref["attention"].keys()


def test_runner_outputs_are_what_was_asked(model):
    x = torch.rand(1, 3, 64, 64)
    levels = TorchRunner(model, outputs=("level_descriptors",))(x)
    assert list(levels) == ["level_descriptors"] and len(levels["level_descriptors"]) == len(model.head.levels)
    taps = TorchRunner(model, outputs=("taps",))(x)["taps"]
    assert set(taps) == {"low", "mid", "high"} and all(isinstance(t, torch.Tensor) for t in taps.values())
    with pytest.raises(HaflocError, match="on its own"):
        TorchRunner(model, outputs=("taps", "descriptor"))
    with pytest.raises(HaflocError, match="use --backend torch"):
        make_runner(model, "onnx", outputs=("level_descriptors",))
    assert isinstance(make_runner(model, "auto", outputs=("level_descriptors",)), TorchRunner)
    with pytest.raises(HaflocError, match="unknown backend"):
        make_runner(model, "tensorrt")


def test_run_batches_groups_by_size_and_skips_bad_files(model, photos, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    sizes = [(64, 96), (96, 64), (64, 96), None, (64, 96), (96, 64), (64, 96)]
    items = list(range(len(sizes)))

    def load(i: int) -> torch.Tensor:
        if sizes[i] is None:
            return to_tensor(load_image(bad))
        return to_tensor(load_image(photos[i % len(photos)]), size=sizes[i])

    seen: list[int] = []
    shapes: dict[int, tuple] = {}
    runner = TorchRunner(model, outputs=("descriptor",))
    for ev in run_batches(runner, items, load, batch_size=2, workers=2):
        if isinstance(ev, Skipped):
            assert ev.item == 3 and isinstance(ev.error, InputError)
            seen.append(ev.item)
            continue
        assert isinstance(ev, Batch) and 1 <= len(ev.items) <= 2
        assert len({sizes[i] for i in ev.items}) == 1  # one size per batch
        assert ev.outputs["descriptor"].shape == (len(ev.items), model.out_dim)
        for i, d in zip(ev.items, ev.outputs["descriptor"]):
            shapes[i] = sizes[i]
            # each row belongs to its item: the same as running that image alone
            alone = runner(load(i).unsqueeze(0))["descriptor"][0]
            assert np.abs(d - alone).max() < 1e-4
        seen += ev.items
    assert sorted(seen) == items
    # items of one size keep their order
    assert [i for i in seen if sizes[i] == (64, 96)] == [0, 2, 4, 6]
