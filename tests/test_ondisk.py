"""Search past RAM (on-disk IVF-PQ, exact re-ranking from the chunk files) and the index's
compact representation (PCA-whitening + float16), on descriptors of real photos."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hafloc.errors import HaflocError, ModelMismatchError
from hafloc.index.compact import Projection
from hafloc.index.search import SearchConfig, knn
from hafloc.index.store import Extracted, IndexStore

REPO = Path(__file__).resolve().parents[1]
FP = "e" * 64
DIM = 192  # 8x8 RGB thumbnail
# explicit sizes: a few hundred photos are too few for the automatic ones (which fall back to flat)
ONDISK = SearchConfig(kind="ondisk", nlist=8, m=24, nbits=6, nprobe=3, refine_factor=8)


def thumb(path: Path) -> np.ndarray:
    """A deterministic global descriptor of a real photo: its 8x8 RGB thumbnail, centred, L2-normalised."""
    with Image.open(path) as im:
        im.draft("RGB", (64, 64))  # JPEG DCT scaling: fast
        x = np.asarray(im.convert("RGB").resize((8, 8), Image.BILINEAR), dtype=np.float32).ravel()
    x = x - x.mean()
    return (x / (np.linalg.norm(x) + 1e-12)).astype(np.float32)


def thumb_extract(paths: list[Path], names: list[str]) -> Extracted:
    return Extracted(list(names), np.stack([thumb(p) for p in paths]))


@pytest.fixture(scope="module")
def tower(shared_data) -> dict:
    """ie_tower_floors: 600 gallery frames (every 4th) and 60 query frames."""
    root = shared_data / "ie_tower_floors" / "images"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    rows = [line.split(",") for line in (shared_data / "ie_tower_floors" / "dataset.csv").read_text().splitlines()[1:]]
    gallery = [r[0] for r in rows if r[2] == "gallery"][::4][:600]
    query = [r[0] for r in rows if r[2] == "query"][::8][:60]
    return {"root": root, "gallery": gallery, "queries": np.stack([thumb(root / q) for q in query])}


def build(
    folder: Path,
    tower: dict,
    config: SearchConfig = ONDISK,
    compact: dict | None = None,
    images: list[str] | None = None,
) -> IndexStore:
    store = IndexStore.open_or_create(folder, FP, DIM, config, model_path="thumb", compact=compact)
    store.add(images or tower["gallery"], tower["root"], thumb_extract, chunk_size=100, progress=False)
    return store


@pytest.fixture(scope="module")
def ondisk_index(tower, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ondisk") / "index"
    build(folder, tower).close()
    return folder


def test_ondisk_top1_agrees_with_exact_and_reranking_orders_exactly(tower, ondisk_index):
    with IndexStore.open(ondisk_index) as store:
        hits = store.search(tower["queries"], k=5)
        assert store._search is not None and store._search.kind == "ondisk"
        ids, _, desc = store.descriptors()
    assert (ondisk_index / "search.ivfdata").is_file() and (ondisk_index / "search.rows.npy").is_file()
    esims, erows = knn(desc, tower["queries"], 5)
    agree = np.mean([h[0].id == ids[e[0]] for h, e in zip(hits, erows)])
    assert agree >= 0.9, agree
    by_id = dict(zip(ids.tolist(), desc))
    for q, h, e, es in zip(tower["queries"], hits, erows, esims):
        got = [m.id for m in h]
        # similarities are the exact inner products of the returned images, best first
        np.testing.assert_allclose([m.similarity for m in h], [float(by_id[i] @ q) for i in got], rtol=1e-5, atol=1e-6)
        assert all(a.similarity >= b.similarity for a, b in zip(h, h[1:]))
        if set(got) == set(ids[e].tolist()):  # the shortlist held the exact top-k: same order
            assert got == ids[e].tolist() or np.allclose(np.sort(es), np.sort([m.similarity for m in h]), atol=1e-6)


def test_reopen_in_a_new_process_moved_and_read_only(tower, ondisk_index, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(ondisk_index, moved)
    np.save(tmp_path / "q.npy", tower["queries"][:10])
    with IndexStore.open(ondisk_index) as store:
        want = [h[0].id for h in store.search(tower["queries"][:10], k=3)]
    for p in [moved, *moved.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        code = textwrap.dedent(f"""
            import json, numpy as np
            from hafloc.index.store import IndexStore
            with IndexStore.open({str(moved)!r}) as store:
                hits = store.search(np.load({str(tmp_path / "q.npy")!r}), k=3)
                print(json.dumps({{"top1": [h[0].id for h in hits], "kind": store._search.kind}}))
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    finally:
        for p in [moved, *moved.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)  # stdout is only our JSON: faiss's notes went to stderr
    assert got == {"top1": want, "kind": "ondisk"}


def test_verify_compares_the_ondisk_row_map_with_the_rows(ondisk_index, tmp_path):
    from hafloc.index.verify import verify_index

    idx = tmp_path / "index"
    shutil.copytree(ondisk_index, idx)
    checks = {c["check"]: c for c in verify_index(idx, check_model=False)["checks"]}
    with IndexStore.open(idx) as store:
        n, n_chunks = len(store), len(store.chunk_files())
    assert checks["search"] == {
        "check": "search",
        "status": "ok",
        "detail": f"ondisk over {n} images, consistent with the rows",
    }
    assert checks["checksums"]["detail"] == f"{n_chunks} chunk file(s) match their checksums"
    rows = np.load(idx / "search.rows.npy")
    rows[[3, 4]] = rows[[4, 3]]  # two search rows re-ranked with each other's vectors
    np.save(idx / "search.rows.npy", rows)
    rep = verify_index(idx, check_model=False)
    search = next(c for c in rep["checks"] if c["check"] == "search")
    assert not rep["ok"] and search["status"] == "damage" and search["detail"].startswith(f"2 of {n} image(s)")


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import hafloc.index.ondisk as ondisk
from test_ondisk import build, tower_dict
ondisk.BLOCK_BYTES = 4 * 192 * 100  # 100 rows per block: six resume points
if sys.argv[2] == "kill":
    calls = []
    real = ondisk.ChunkVectors.range
    def range_then_die(self, start, stop):
        calls.append(start)
        if len(calls) == 3:  # two blocks written: die before the third is
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, start, stop)
    ondisk.ChunkVectors.range = range_then_die
build(__import__("pathlib").Path(sys.argv[1]), tower_dict()).close()
"""


def tower_dict() -> dict:
    """The ``tower`` fixture's data, for the subprocess of the kill test."""
    root = Path(os.environ.get("HAFLOC_SHARED_DATA", REPO.parent / "shared" / "data"))
    rows = [line.split(",") for line in (root / "ie_tower_floors" / "dataset.csv").read_text().splitlines()[1:]]
    return {
        "root": root / "ie_tower_floors" / "images",
        "gallery": [r[0] for r in rows if r[2] == "gallery"][::4][:600],
    }


def test_kill_during_ondisk_build_then_rerun_completes_without_duplicates(tower, ondisk_index, tmp_path):
    folder = tmp_path / "index"
    script = tmp_path / "build.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    killed = subprocess.run([sys.executable, str(script), str(folder), "kill"], capture_output=True, timeout=300)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    blocks = sorted((folder / "search.blocks").glob("block_*.faiss"))
    assert len(blocks) == 2 and not (folder / "search.faiss.json").exists()  # killed mid-build, not complete
    kept = {p.name: p.stat().st_mtime_ns for p in blocks}
    rerun = subprocess.run([sys.executable, str(script), str(folder), "rerun"], capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in blocks} == kept  # resumed: the finished blocks were reused
    assert len(list((folder / "search.blocks").glob("block_*.faiss"))) == 6
    assert not list(folder.glob(".*partial*"))
    with IndexStore.open(folder) as store, IndexStore.open(ondisk_index) as ref:
        index = store._ensure_search()
        assert index is not None and index.kind == "ondisk" and index.ntotal == len(store) == 594
        ivf = __import__("faiss").extract_index_ivf(index.index)
        listed = np.concatenate(
            [
                __import__("faiss").rev_swig_ptr(ivf.invlists.get_ids(i), ivf.invlists.list_size(i))
                for i in range(ivf.nlist)
            ]
        )
        assert sorted(listed.tolist()) == list(range(594))  # every row once: no duplicates, none lost
        assert [h[0].id for h in store.search(tower["queries"], k=3)] == [
            h[0].id for h in ref.search(tower["queries"], k=3)
        ]


def test_compact_projection_float16_recorded_and_queries_projected_like_the_db(tower, tmp_path):
    folder = tmp_path / "compact"
    images = tower["gallery"][:300]
    store = build(folder, tower, SearchConfig(kind="flat"), compact={"dim": 32, "dtype": "float16"}, images=images)
    with store:
        info = json.loads((folder / "index.json").read_text())
        assert (info["dim"], info["dtype"], info["projection"]) == (
            32,
            "float16",
            {"input_dim": DIM, "dim": 32, "fitted_on": 300},
        )
        chunk = np.load(next((folder / "chunks").glob("chunk_*.npy")))
        assert chunk.dtype == np.float16 and chunk.shape[1] == 32
        _, names, stored = store.descriptors()
        # a manual projection fitted on the same sample (the first images added)
        raw = np.stack([thumb(tower["root"] / n) for n in images])
        manual = Projection.fit(raw, 32)
        db = manual(raw)
        np.testing.assert_allclose(stored, db[[images.index(n) for n in names]], atol=2e-3)  # float16 tolerance
        np.testing.assert_allclose(store.project(tower["queries"]), manual(tower["queries"]), atol=1e-5)
        hits = store.search(tower["queries"], k=1)
        _, erows = knn(db, manual(tower["queries"]), 1)
        assert np.mean([images.index(h[0].image) == e[0] for h, e in zip(hits, erows)]) >= 0.95
        with pytest.raises(ModelMismatchError, match=r"100-D.*192-D \(projected to 32-D\)"):
            store.search(np.ones(100, np.float32))
        projection = (folder / "projection.npz").read_bytes()
        store.add(tower["gallery"][300:320], tower["root"], thumb_extract, progress=False)  # fitted once, reused
        assert (folder / "projection.npz").read_bytes() == projection and len(store) == 320
    with pytest.raises(HaflocError, match="32-D float16.*64-D float16"):
        IndexStore.open_or_create(folder, FP, DIM, compact={"dim": 64, "dtype": "float16"})
    with pytest.raises(HaflocError, match="below the model's 192-D"):
        IndexStore.create(tmp_path / "big", FP, DIM, compact={"dim": 500})


def test_float16_storage_within_tolerance_of_float32(tower, tmp_path):
    images = tower["gallery"][:200]
    with (
        build(tmp_path / "f32", tower, SearchConfig(kind="flat"), images=images) as a,
        build(tmp_path / "f16", tower, SearchConfig(kind="flat"), compact={"dtype": "float16"}, images=images) as b,
    ):
        _, na, da = a.descriptors()
        _, nb, db = b.descriptors()
        assert na == nb and b.dtype == "float16" and b.input_dim == b.dim == DIM
        np.testing.assert_allclose(db, da, atol=1e-3)  # float16: 11-bit mantissa on unit-norm components
        assert [h[0].image for h in a.search(tower["queries"], k=1)] == [
            h[0].image for h in b.search(tower["queries"], k=1)
        ]


FIT_KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
import hafloc.index.compact as compact
from hafloc.index.search import SearchConfig
from test_ondisk import build, thumb_extract, tower_dict
import test_ondisk
compact.MAX_FIT_BYTES = 4 * 192 * 150  # fit on the first 150 images: 2 chunks of 100
kill_at = int(sys.argv[2])
calls = []
def extract(paths, names):
    calls.append(1)
    if len(calls) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return thumb_extract(paths, names)
test_ondisk.thumb_extract = extract
t = tower_dict()
t["gallery"] = t["gallery"][:400]
build(Path(sys.argv[1]), t, SearchConfig(kind="flat"), compact={{"dim": 32, "dtype": "float16"}}).close()
"""


def test_projection_fit_survives_kills_before_and_after_it(tower, tmp_path, monkeypatch):
    script = tmp_path / "build.py"
    script.write_text(FIT_KILL_SCRIPT.format(tests=str(Path(__file__).parent)))
    run = lambda folder, kill_at: subprocess.run(  # noqa: E731
        [sys.executable, str(script), str(folder), str(kill_at)],
        capture_output=True,
        timeout=300,
    )
    ref = tmp_path / "ref"  # uninterrupted, in this process, with the same fit sample size
    monkeypatch.setattr("hafloc.index.compact.MAX_FIT_BYTES", 4 * 192 * 150)
    build(
        ref, tower, SearchConfig(kind="flat"), compact={"dim": 32, "dtype": "float16"}, images=tower["gallery"][:400]
    ).close()
    # killed while describing the fit sample: nothing stored yet, the rerun fits afresh
    before = tmp_path / "before"
    assert run(before, 2).returncode == -9
    assert (
        not (before / "projection.npz").exists()
        and json.loads((before / "index.json").read_text())["projection"]["fitted_on"] == 0
    )
    # killed after the fit (projection stored, sample committed): the rerun keeps that projection
    after = tmp_path / "after"
    assert run(after, 3).returncode == -9
    fitted = (after / "projection.npz").read_bytes()
    with IndexStore.open(after) as store:
        assert len(store) == 200 and store.info["projection"]["fitted_on"] == 200
    for folder in (before, after):
        rerun = run(folder, 0)
        assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert (after / "projection.npz").read_bytes() == fitted == (ref / "projection.npz").read_bytes()
    with IndexStore.open(ref) as r:
        _, names, desc = r.descriptors()
        for folder in (before, after):
            with IndexStore.open(folder) as s:
                _, n2, d2 = s.descriptors()
                assert len(n2) == len(set(n2)) == 400 and sorted(n2) == sorted(names)
                np.testing.assert_array_equal(d2[[n2.index(n) for n in names]], desc)
