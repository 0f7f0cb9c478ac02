"""Extraction: bad files, EXIF, output formats, resume after a real kill, and untrained
retrieval on real indoor photos (issue 2)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from hafloc.cli import main
from hafloc.descriptors.extract import Extractor
from hafloc.descriptors.fit import fit_clusters
from hafloc.descriptors.modelfile import load_model, save_model
from hafloc.descriptors.network import GeoLocNet, ModelConfig
from hafloc.errors import InputError
from hafloc.images.io import ImageTooLarge, load_image
from hafloc.index.search import knn


@pytest.fixture(scope="module")
def photos(shared_data):
    return sorted((shared_data / "landmarks_mini" / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, photos):
    torch.manual_seed(0)
    model = GeoLocNet(ModelConfig.for_method("haf", num_clusters=8, proj_dim=32))
    model.config.max_side = 128
    fit_clusters(model, photos[:6], samples_per_image=40, progress=False)
    return save_model(model, tmp_path_factory.mktemp("m") / "small.model")


def _bad_folder(root, photos):
    good = root / "good"
    (good / "sub").mkdir(parents=True)
    img = Image.open(photos[0]).convert("RGB").resize((160, 120))
    img.save(good / "a.jpg")
    img.convert("CMYK").save(good / "cmyk.jpg")
    img.convert("L").save(good / "sub" / "gray.png")
    rgba = img.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(good / "alpha.png")
    bad = {
        "empty.jpg": b"",
        "notes.jpg": b"this is not an image at all",
        "truncated.jpg": (good / "a.jpg").read_bytes()[:300],
    }
    for name, data in bad.items():
        (good / name).write_bytes(data)
    Image.new("1", (12000, 12000)).save(good / "huge.png")  # 144 MP: refused, not decoded
    return good, ["empty.jpg", "notes.jpg", "truncated.jpg", "huge.png"]


def test_bad_files_are_skipped_and_named(tmp_path, photos, small_model, capsys):
    folder, bad = _bad_folder(tmp_path, photos)
    out = tmp_path / "d.npz"
    rc = main(
        [
            "extract",
            "--model",
            str(small_model),
            str(folder),
            "--output",
            str(out),
            "--no-progress",
            "--backend",
            "torch",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    for name in bad:
        assert name in err
    assert "empty file" in err and "not an image" in err and "too large" in err
    z = np.load(out)
    assert sorted(z["names"].tolist()) == ["a.jpg", "alpha.png", "cmyk.jpg", "sub/gray.png"]
    d = z["descriptors"]
    assert d.dtype == np.float32 and np.allclose(np.linalg.norm(d, axis=1), 1, atol=1e-5)
    # nothing readable at all -> exit status 2
    rc = main(
        [
            "extract",
            "--model",
            str(small_model),
            *(str(folder / b) for b in bad),
            "--output",
            str(tmp_path / "none.npz"),
            "--no-progress",
            "--backend",
            "torch",
        ]
    )
    assert rc == 2 and not (tmp_path / "none.npz").exists()  # all input bad: exit status 2


def test_load_image_errors_name_file_and_cause(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(InputError) as e:
        load_image(tmp_path / "x.jpg")
    assert str(e.value) == f"{tmp_path / 'x.jpg'}: empty file"
    with pytest.raises(InputError, match="no such|cannot read"):
        load_image(tmp_path / "missing.jpg")


def test_an_upload_decodes_from_memory_as_its_file_does(tmp_path, photos):
    """Bytes (a server's upload) load exactly as the same file, EXIF rotation included, and errors
    name the upload, not a temporary file."""
    img = Image.open(photos[1]).convert("RGB").resize((192, 128))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "tagged.jpg", exif=exif.tobytes(), quality=95)
    data = (tmp_path / "tagged.jpg").read_bytes()
    from_bytes = load_image(data, name="phone.jpg")
    assert from_bytes.size == (128, 192)
    assert np.array_equal(np.asarray(from_bytes), np.asarray(load_image(tmp_path / "tagged.jpg")))
    with pytest.raises(InputError) as e:
        load_image(data[: len(data) // 3], name="phone.jpg")
    assert str(e.value).startswith("phone.jpg: corrupt or truncated image")
    with pytest.raises(InputError) as e:
        load_image(b"", name="empty.jpg")
    assert str(e.value) == "empty.jpg: empty file"
    with pytest.raises(InputError) as e:
        load_image(b"not an image at all", name="notes.txt")
    assert str(e.value) == "notes.txt: not an image (unrecognised format)"


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` (bilevel) but holds no pixel data: a bomb's header."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_pixel_cap_is_per_call_and_pillow_global_untouched(tmp_path, photos):
    code = (
        "from PIL import Image; before = Image.MAX_IMAGE_PIXELS; "
        "import hafloc.images.io, hafloc.descriptors.extract, hafloc.cli, hafloc.serve.app; "
        "assert Image.MAX_IMAGE_PIXELS == before, Image.MAX_IMAGE_PIXELS"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with pytest.raises(InputError, match=r"image too large \(\d+x\d+ = 0\.\d MP; the limit is 0\.001 MP\)"):
        load_image(photos[0], max_pixels=1000)
    assert load_image(photos[0], max_pixels=None).width > 100
    (tmp_path / "cap.png").write_bytes(_png_header(11_000, 11_000))  # 121 MP: above our cap only
    with pytest.raises(InputError, match=r"cap\.png: image too large \(11000x11000 = 121\.0 MP; the limit is 120 MP\)"):
        load_image(tmp_path / "cap.png")
    (tmp_path / "bomb.png").write_bytes(_png_header(40_000, 40_000))  # 1.6 GP: Pillow's own guard refuses
    for cap in (None, 2_000_000_000):  # as our cap's refusal: a server answers both 413
        with pytest.raises(ImageTooLarge, match=r"bomb\.png: image too large \(Image size \(1600000000 pixels\)"):
            load_image(tmp_path / "bomb.png", max_pixels=cap)


def test_atomic_writes_never_touch_the_umask(tmp_path, monkeypatch):
    """The umask is process-wide: setting it (even for a moment) races with other threads' file creation."""
    from hafloc.fileio import atomic_path, write_json_atomic

    old = os.umask(0o027)
    try:

        def no_umask(*_a):
            raise AssertionError("os.umask called")

        monkeypatch.setattr(os, "umask", no_umask)
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        with atomic_path(tmp_path / "b.npy") as tmp:
            np.save(tmp, np.zeros(3))
    finally:
        monkeypatch.undo()
        os.umask(old)
    for name in ("a.json", "b.npy"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640  # 0o666 & ~umask, as for any new file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.npy"]  # no temp files left


def test_exif_orientation_is_applied(tmp_path, photos, small_model):
    img = Image.open(photos[1]).convert("RGB").resize((192, 128))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "tagged.jpg", exif=exif.tobytes(), quality=95)
    upright = Image.open(tmp_path / "tagged.jpg")
    upright = upright.transpose(Image.Transpose.ROTATE_270)
    upright.save(tmp_path / "upright.png")
    loaded = load_image(tmp_path / "tagged.jpg")
    assert loaded.size == (128, 192)
    assert load_image(tmp_path / "tagged.jpg", exif_transpose=False).size == (192, 128)
    ex = Extractor(load_model(small_model), batch_size=2)
    res = ex.extract_paths([tmp_path / "tagged.jpg", tmp_path / "upright.png"], progress=False)
    assert np.abs(res.descriptors[0] - res.descriptors[1]).max() < 1e-5


def test_h5_output_uses_hloc_layout(tmp_path, photos, small_model):
    folder = tmp_path / "imgs"
    (folder / "x").mkdir(parents=True)
    for i, p in enumerate(photos[:3]):
        Image.open(p).convert("RGB").resize((160, 120)).save(folder / ("x" if i else "") / f"{i}.jpg")
    out = tmp_path / "g.h5"
    assert (
        main(
            [
                "extract",
                "--model",
                str(small_model),
                str(folder),
                "--output",
                str(out),
                "--no-progress",
                "--backend",
                "torch",
            ]
        )
        == 0
    )
    with h5py.File(out) as f:
        names = []
        f.visit(lambda n: names.append(n) if n.endswith("global_descriptor") else None)
        assert sorted(names) == ["0.jpg/global_descriptor", "x/1.jpg/global_descriptor", "x/2.jpg/global_descriptor"]
        d = f["x/1.jpg/global_descriptor"][()]
    assert d.shape == (load_model(small_model).out_dim,) and abs(np.linalg.norm(d) - 1) < 1e-5


def test_killed_extraction_resumes(tmp_path, photos, small_model):
    folder = tmp_path / "many"
    folder.mkdir()
    base = [Image.open(p).convert("RGB").resize((160, 120)) for p in photos[:6]]
    for i in range(90):
        base[i % 6].rotate(i * 3).save(folder / f"{i:03d}.jpg")
    cmd = [
        sys.executable,
        "-m",
        "hafloc",
        "extract",
        "--model",
        str(small_model),
        str(folder),
        "--backend",
        "torch",
        "--batch-size",
        "2",
        "--checkpoint-every",
        "0",
        "--no-progress",
        "--threads",
        "1",
    ]
    ref_out = tmp_path / "ref.npz"
    subprocess.run(cmd + ["--output", str(ref_out)], check=True, capture_output=True)
    out = tmp_path / "out.npz"
    ckpt = tmp_path / "out.npz.resume.npz"
    proc = subprocess.Popen(cmd + ["--output", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    done_before = 0
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            try:
                done_before = len(np.load(ckpt)["names"])
            except Exception:  # being replaced right now
                done_before = 0
            if done_before >= 10:
                break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("extraction finished before it could be killed (machine too fast for this check)")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and ckpt.exists()
    res = subprocess.run(cmd + ["--output", str(out)], capture_output=True, text=True, check=True)
    assert "resuming" in res.stderr
    assert not ckpt.exists()
    a, b = np.load(ref_out), np.load(out)
    assert a["names"].tolist() == b["names"].tolist() and len(a["names"]) == 90
    assert np.abs(a["descriptors"] - b["descriptors"]).max() < 1e-5


def _ie_tower(shared_data):
    root = shared_data / "ie_tower_floors"
    rows = list(csv.DictReader(open(root / "dataset.csv")))
    gallery = [r for r in rows if r["split"] == "gallery"]
    queries = [r for r in rows if r["split"] == "query"]
    return root / "images", gallery, queries


@pytest.mark.parametrize("method,min_rate", [("haf", 0.40), ("netvlad", 0.30)])
def test_untrained_models_find_the_same_floor(shared_data, method, min_rate):
    """Clusters fitted on gallery images; no training. Chance is about 4% (25 floors)."""
    images, gallery, queries = _ie_tower(shared_data)
    gallery, queries = gallery[::2], queries[::4]
    rng = np.random.default_rng(0)
    fit_rows = [gallery[i] for i in rng.choice(len(gallery), 80, replace=False)]
    torch.manual_seed(0)
    model = GeoLocNet(ModelConfig.for_method(method)).eval()
    model.config.max_side = 256
    fit_clusters(model, [images / r["image"] for r in fit_rows], samples_per_image=80, progress=False)
    ex = Extractor(model, batch_size=8)
    db = ex.extract_paths([images / r["image"] for r in gallery], progress=False)
    q = ex.extract_paths([images / r["image"] for r in queries], progress=False)
    assert not db.failures and not q.failures
    _, idx = knn(db.descriptors, q.descriptors, 1)
    g_label = np.array([r["label"] for r in gallery])
    q_label = np.array([r["label"] for r in queries])
    rate = float((g_label[idx[:, 0]] == q_label).mean())
    chance = float(np.mean([(g_label == lab).mean() for lab in q_label]))
    print(f"{method}: same-floor top-1 {rate:.3f} (chance {chance:.3f}, {len(queries)} queries)")
    assert rate > min_rate and rate > 8 * chance
