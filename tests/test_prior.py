"""The position prior (``locate --near LAT,LON --within M``): only database photos within M metres
are searched, exactly, on every search structure; a far-away look-alike is excluded."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from PIL import Image

from hafloc.datasets.geo import haversine_m
from hafloc.errors import HaflocError
from hafloc.index.prior import Near
from hafloc.index.search import SearchConfig, knn
from hafloc.index.store import IndexStore
from test_ondisk import DIM, FP, ONDISK, thumb, thumb_extract

ST_PAULS = (51.5138, -0.0984)
SYDNEY = (-33.8568, 151.2153)
DUBLIN = (53.3498, -6.2603)
KINDS = {
    "flat": SearchConfig(kind="flat"),
    "ivfpq": SearchConfig(kind="ivfpq", nlist=8, m=24, nbits=6, nprobe=3),
    "ondisk": ONDISK,
}


def _around(center: tuple[float, float], n: int, radius_m: float, rng: np.random.Generator) -> list[tuple]:
    """``n`` positions scattered within ``radius_m`` of ``center`` (a small flat patch)."""
    r = radius_m * np.sqrt(rng.uniform(0, 1, n))
    a = rng.uniform(0, 2 * np.pi, n)
    lat = center[0] + r * np.cos(a) / 111_320
    lon = center[1] + r * np.sin(a) / (111_320 * np.cos(np.radians(center[0])))
    return list(zip(lat.tolist(), lon.tolist()))


@pytest.fixture(scope="module")
def photos(shared_data, tmp_path_factory) -> dict:
    """Real photos: the query's exact copy in Sydney (the look-alike), a slightly cropped copy at
    St Paul's (the right answer), 30 unrelated frames around St Paul's and 300 in Dublin."""
    root = tmp_path_factory.mktemp("prior_photos")
    src = shared_data / "landmarks_mini" / "images"
    query = sorted(src.glob("st_pauls_cathedral_*.jpg"))[0]
    with Image.open(query) as im:
        im = im.convert("RGB")
        w, h = im.size
        im.crop((w // 20, h // 20, w - w // 20, h - h // 20)).save(root / "near_copy.jpg", quality=90)
        im.save(root / "far_copy.jpg", quality=95)
    rng = np.random.default_rng(0)
    positions = {"near_copy.jpg": ST_PAULS, "far_copy.jpg": SYDNEY}
    frames = sorted((shared_data / "ie_tower_floors" / "images").rglob("*.jpg"))[::3][:330]
    for i, (f, pos) in enumerate(zip(frames, _around(ST_PAULS, 30, 400, rng) + _around(DUBLIN, 300, 2000, rng))):
        name = f"frame_{i:03d}{f.suffix}"
        (root / name).symlink_to(f)
        positions[name] = pos
    return {"root": root, "query": thumb(query), "positions": positions}


@pytest.fixture(scope="module", params=sorted(KINDS))
def store(request, photos, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"prior_{request.param}") / "index"
    s = IndexStore.open_or_create(folder, FP, DIM, KINDS[request.param], model_path="thumb")
    s.add(sorted(photos["positions"]), photos["root"], thumb_extract, positions=photos["positions"], progress=False)
    yield s
    s.close()


def test_a_far_look_alike_is_excluded_and_the_nearby_photo_found(store, photos):
    best = store.search(photos["query"], k=1)[0]
    assert best.image == "far_copy.jpg"  # without the prior, the exact copy in Sydney wins
    hits = store.search(photos["query"], k=5, near=Near(*ST_PAULS, 500))
    assert hits[0].image == "near_copy.jpg"
    assert all(haversine_m(*ST_PAULS, m.lat, m.lon) <= 500 for m in hits)


def test_the_prior_ranks_exactly_before_truncating(store, photos):
    # the photos in the radius, found independently, ranked by exact inner product
    ids, _, desc = store.descriptors()
    meta = {r["id"]: r for r in store.images()}
    near = Near(*ST_PAULS, 300)
    inside = np.array([haversine_m(*ST_PAULS, meta[i]["lat"], meta[i]["lon"]) <= 300 for i in ids.tolist()])
    assert 10 < inside.sum() < 31  # some of the 30 frames lie farther than 300 m
    sims, rows = knn(desc[inside], photos["query"][None], 10)
    expected = ids[inside][rows[0]].tolist()
    got = store.search(photos["query"][None], k=10, near=near)[0]
    assert [m.id for m in got] == expected  # 10 of them: nothing lost to a truncated global top-K
    assert np.allclose([m.similarity for m in got], sims[0], atol=1e-5)
    assert store.search(photos["query"], k=50, near=Near(*SYDNEY, 1000))[0].image == "far_copy.jpg"
    assert store.search(photos["query"], k=5, near=Near(0.0, 0.0, 1000)) == []


@pytest.mark.parametrize(
    "center",
    [(51.5, -0.1), (0.0, 179.999), (0.0, -179.999), (89.99, 20.0), (-89.99, -20.0), (-33.9, 151.2)],
)
@pytest.mark.parametrize("within", [1.0, 250.0, 50_000.0, 3_000_000.0])
def test_the_sql_box_keeps_every_photo_within_the_radius(center, within):
    rng = np.random.default_rng(1)
    lat = np.clip(center[0] + rng.normal(0, np.degrees(2 * within / 6.371e6) + 1e-5, 4000), -90, 90)
    lon = (center[1] + rng.normal(0, np.degrees(2 * within / 6.371e6) + 1e-5, 4000) + 180) % 360 - 180
    near = Near(*center, within)
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE images (id INTEGER, lat REAL, lon REAL)")
    db.executemany("INSERT INTO images VALUES (?, ?, ?)", zip(range(len(lat)), lat.tolist(), lon.tolist()))
    cond, params = near.sql()
    boxed = {i for (i,) in db.execute(f"SELECT id FROM images WHERE {cond}", params)}
    inside = set(np.nonzero(near.contains(lat, lon))[0].tolist())
    assert inside and inside <= boxed


def test_bad_priors_are_one_line_errors():
    assert Near.parse(None, None) is None
    assert Near.parse("51.5, -0.1", 200) == Near(51.5, -0.1, 200.0)
    for near, within, msg in [
        ("51.5", 100, "expected LAT,LON"),
        ("91,0", 100, "not a position"),
        ("51.5,-0.1", 0, "positive number of metres"),
        ("51.5,-0.1", None, "go together"),
        (None, 100, "go together"),
        ("nan,1", 100, "not a position"),
    ]:
        with pytest.raises(HaflocError, match=msg):
            Near.parse(near, within)
