"""Calibration benchmark (issue 11): is ``locate``'s confidence a probability?

For each dataset an index is built from its database images with the *untrained* default model
(HAF on the pretrained EfficientNet-Lite0, clusters fitted on 30 database images, as
``hafloc model init`` builds it, at a small image size), calibrated by leave-one-out over the
database (``hafloc index calibrate``), and the held-out queries are located against it. Reported:

* query accuracy (estimate within 25 m) and the ECE (10 bins) of three confidences: the old
  heuristic (agreement x margin), the uncalibrated fallback (heuristic x the unrelated gate of the
  index: 0 up to the best similarity blank and noise frames reach on it) and
  the calibrated probability; the leave-one-out held-out-fold ECE;
* accuracy of the most confident 90 % and 50 % of the queries (ranked by the calibrated probability);
* the highest confidence any unrelated photo gets (uniform noise, flat grey, and the other
  domain: outdoor photos against an indoor index, indoor frames against outdoor ones).

Datasets (from ../shared/data; the synthetic city is generated):

* ``ie_tower``: ie_tower_floors, the whole gallery as the database, every 2nd query frame (queries
  come from the gallery's video clips; a sparser gallery would make leave-one-out harder than them).
  Labels as places: each floor gets a synthetic position 1.1 km from the next; each video clip of
  a floor sits on a 10 m circle around it (clips of a floor agree within 25 m; a clip's own frames
  share one point, so ``--exclude-m 5`` hides exactly the photo's own clip).
* ``gardenspoint``: gardenspoint_mini, night references + two views of each triplet place vs day
  frames + the third triplet view; a distinct position per place 150 m apart (so ``exclude_m`` 5
  hides every same-place view). ``gardenspoint+lund`` adds the 29 Lund photos (EXIF GPS, one dense
  cluster around the cathedral) to the database.
* ``synthetic``: the demo's synthetic city (full preset, all three areas, '@' positions) with 3
  database views per place; ``synthetic-2views`` is the demo's exact city (2 views per place at
  deliberately different scales: no database photo finds its place's other view, so
  leave-one-out has no right answer and calibration refuses).

Both exclusion radii are reported: 0 (hide the photo only) and 5 m (the default).

    python benchmarks/calibration.py                      # ~10 min on 2 cores; updates BENCHMARKS.md
    python benchmarks/calibration.py --datasets gardenspoint --no-write
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hafloc.datasets.geo import haversine_m
from hafloc.descriptors.extract import Extractor
from hafloc.descriptors.fit import fit_clusters
from hafloc.descriptors.network import GeoLocNet, ModelConfig
from hafloc.errors import HaflocError
from hafloc.index.calibrate import calibrate_index, describe_probes, unrelated_similarity
from hafloc.index.calibration_model import accuracy_at_coverage, expected_calibration_error
from hafloc.index.locate import estimate_position, fallback_confidence
from hafloc.index.positions import resolve_position
from hafloc.index.store import Extracted, IndexStore
from hafloc.reports import markdown_table
from mdsection import update_section

REPO = Path(__file__).resolve().parents[1]
M_PER_DEG = 111_195.0
AGREE_M = 25.0


def offset(lat: float, lon: float, north_m: float, east_m: float) -> tuple[float, float]:
    return lat + north_m / M_PER_DEG, lon + east_m / (M_PER_DEG * math.cos(math.radians(lat)))


# -- datasets: (db [(root, rel, lat, lon)], queries [(path, lat, lon)], unrelated [path]) ----------


def ie_tower(data: Path, out: Path) -> tuple[list, list, list]:
    import csv
    import re

    root = data / "ie_tower_floors"
    rows = list(csv.DictReader(open(root / "dataset.csv")))
    labels = sorted({r["label"] for r in rows})
    clips: dict[str, list[str]] = {}
    for r in rows:
        clip = re.sub(r"_frame_\d+\.\w+$", "", r["image"])
        clips.setdefault(r["label"], [])
        if clip not in clips[r["label"]]:
            clips[r["label"]].append(clip)
    centre = {lab: (10.0 + 0.01 * i, 20.0) for i, lab in enumerate(labels)}

    def pos(r):
        clip = re.sub(r"_frame_\d+\.\w+$", "", r["image"])
        cs = clips[r["label"]]
        a = 2 * math.pi * cs.index(clip) / len(cs)
        return offset(*centre[r["label"]], 10 * math.cos(a), 10 * math.sin(a))

    gal = [r for r in rows if r["split"] == "gallery"]
    qry = [r for r in rows if r["split"] == "query"][::2]
    db = [(root / "images", r["image"], *pos(r)) for r in gal]
    qs = [(root / "images" / r["image"], *pos(r)) for r in qry]
    unrelated = sorted((data / "lund_gps" / "images").glob("*.jpg"))[::3]
    return db, qs, unrelated + synthetic_unrelated(out)


def gardenspoint(data: Path, out: Path, with_lund: bool = False) -> tuple[list, list, list]:
    gp = data / "gardenspoint_mini"
    lat0, lon0 = -27.4772, 153.0283
    db, qs = [], []
    for p in sorted((gp / "vprtutorial_first10").rglob("*.jpg")):
        lat, lon = offset(lat0, lon0, 150.0 * int(p.stem), 0.0)
        if p.parent.name == "ref":
            db.append((gp, p.relative_to(gp).as_posix(), lat, lon))
        else:
            qs.append((p, lat, lon))
    for p in sorted((gp / "nicktrinh_triplets").rglob("*.jpg")):
        rel = p.relative_to(gp)
        lat, lon = offset(lat0, lon0, 150.0 * (20 + int(rel.parts[1][1:])), 0.0)
        if rel.parts[2] == "i0":
            qs.append((p, lat, lon))
        else:
            db.append((gp, rel.as_posix(), lat, lon))
    lund = data / "lund_gps" / "images"
    for p in sorted(lund.glob("*.jpg")) if with_lund else []:
        pos = resolve_position(p, p.name, None)
        db.append((lund, p.name, pos.lat, pos.lon))
    indoor = sorted((data / "ie_tower_floors").rglob("*.jpg"))[::300]
    return db, qs, indoor + synthetic_unrelated(out)


def synthetic(data: Path, out: Path, db_per_place: int = 3) -> tuple[list, list, list]:
    from hafloc.datasets.detect import load_dataset
    from hafloc.synth import SyntheticCityConfig, generate_city

    root = generate_city(out / "city", SyntheticCityConfig(seed=0, db_per_place=db_per_place), progress=True)
    db, qs = [], []
    for split in ("train", "val", "test"):
        ds = load_dataset(root, "at", split=split)
        for p in ds.db_paths():
            rel = p.relative_to(root).as_posix()
            pos = resolve_position(p, rel, None)
            db.append((root, rel, pos.lat, pos.lon))
        for p in ds.q_paths():
            pos = resolve_position(p, p.name, None)
            qs.append((p, pos.lat, pos.lon))
    indoor = sorted((data / "ie_tower_floors").rglob("*.jpg"))[::300]
    return db, qs, indoor + synthetic_unrelated(out)


def synthetic_unrelated(out: Path) -> list[Path]:
    folder = out / "unrelated"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(folder / f"noise{i}.png")
        Image.fromarray(rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)).save(paths[-1])
        paths.append(folder / f"grey{i}.png")
        Image.new("RGB", (480, 360), (128 - 70 * i,) * 3).save(paths[-1])
    return paths


DATASETS = {
    "ie_tower": ie_tower,
    "gardenspoint": gardenspoint,
    "gardenspoint+lund": lambda data, out: gardenspoint(data, out, with_lund=True),
    "synthetic": synthetic,
    "synthetic-2views": lambda data, out: synthetic(data, out, db_per_place=2),
}


# -- the run -----------------------------------------------------------------------------------


def default_model(fit_paths: list[Path], max_side: int) -> GeoLocNet:
    torch.manual_seed(0)
    cfg = ModelConfig.for_method("haf")
    cfg.max_side = max_side
    model = GeoLocNet(cfg, pretrained=True)
    fit_clusters(model, fit_paths, seed=0, progress=True)
    return model.eval()


def answers(
    store: IndexStore, descs: np.ndarray, truth: list[tuple[float, float]] | None, cal, floor, k: int = 10
) -> dict[str, np.ndarray]:
    """Per query: heuristic, fallback (gated by the index's unrelated similarity ``floor``) and
    calibrated confidence, and (with ``truth``) the label."""
    out: dict[str, list[float]] = {"heuristic": [], "fallback": [], "calibrated": [], "label": []}
    for i, ms in enumerate(store.search(descs, max(k, cal.k))):
        est = estimate_position(ms[:k], AGREE_M)
        out["heuristic"].append(0.0 if est is None else est.confidence)
        out["fallback"].append(fallback_confidence(est, floor))
        cest = estimate_position(ms[: cal.k], cal.agree_m)
        out["calibrated"].append(cal.confidence(ms[: cal.k], cest))
        if truth is not None:
            out["label"].append(float(cest is not None and haversine_m(cest.lat, cest.lon, *truth[i]) <= AGREE_M))
    return {key: np.asarray(v) for key, v in out.items()}


def run_dataset(name: str, data: Path, out: Path, max_side: int, excludes: list[float]) -> list[dict]:
    work = out / name
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    db, qs, unrelated = DATASETS[name](data, work)
    key = hashlib.sha256(
        json.dumps(
            [[str(r), rel] for r, rel, _, _ in db] + [str(p) for p, _, _ in qs] + [str(p) for p in unrelated]
        ).encode()
    ).hexdigest()[:12]
    cache = work / f"descriptors_{max_side}_{key}_probes.npz"
    if cache.is_file():
        z = np.load(cache)
        d_db, d_q, d_un, d_pr = z["db"], z["q"], z["un"], z["probes"]
    else:
        rng = np.random.default_rng(0)
        fit = [db[i] for i in sorted(rng.choice(len(db), min(30, len(db)), replace=False))]
        model = default_model([r / rel for r, rel, _, _ in fit], max_side)
        ex = Extractor(model, batch_size=16, backend="torch")

        def extract(paths):
            res = ex.extract_paths(paths, progress=True)
            if res.failures:
                raise SystemExit(f"unreadable: {res.failures[:3]}")
            return res.descriptors

        d_db = extract([r / rel for r, rel, _, _ in db])
        d_q = extract([p for p, _, _ in qs])
        d_un = extract(list(unrelated))
        d_pr = describe_probes(ex)
        np.savez(cache, db=d_db, q=d_q, un=d_un, probes=d_pr)
    print(
        f"[{name}] {len(db)} database, {len(qs)} queries, {len(unrelated)} unrelated; "
        f"descriptors in {time.time() - t0:.0f} s",
        flush=True,
    )
    index = work / "index"
    shutil.rmtree(index, ignore_errors=True)
    store = IndexStore.create(index, f"calibration-benchmark-{name}", d_db.shape[1])
    desc_by = {(str(r), rel): d for (r, rel, _, _), d in zip(db, d_db)}
    for root in sorted({str(r) for r, _, _, _ in db}):
        part = [(rel, lat, lon) for r, rel, lat, lon in db if str(r) == root]

        def fn(paths, names, root=root):
            return Extracted(list(names), np.stack([desc_by[(root, n)] for n in names]))

        store.add(
            [rel for rel, _, _ in part], root, fn, positions={rel: (lat, lon) for rel, lat, lon in part}, progress=False
        )
    rows = []
    truth = [(lat, lon) for _, lat, lon in qs]
    for ex_m in excludes:
        t = time.time()
        try:
            cal = calibrate_index(store, agree_m=AGREE_M, exclude_m=ex_m, progress=False, write=False, probes=d_pr)
        except HaflocError as err:
            counts = re.search(r"(\d+) right and (\d+) wrong", str(err))
            few = re.search(r"only (\d+) positioned photos, (\d+) needed", str(err))
            rows.append(
                {
                    "dataset": name,
                    "db / queries": f"{len(db)} / {len(qs)}",
                    "exclude m": f"{ex_m:g}",
                    "LOO n (right %)": "not calibrated: "
                    + (
                        f"{counts[1]} right, {counts[2]} wrong"
                        if counts
                        else f"{few[1]} positioned photos, {few[2]} needed"
                        if few
                        else str(err)
                    ),
                }
            )
            print(f"[{name}] exclude {ex_m:g} m: {err}", flush=True)
            continue
        floor = unrelated_similarity(store, d_pr)
        q = answers(store, d_q, truth, cal, floor)
        un = answers(store, d_un, None, cal, floor)
        y = q["label"]
        rows.append(
            {
                "dataset": name,
                "db / queries": f"{len(db)} / {len(qs)}",
                "exclude m": f"{ex_m:g}",
                "LOO n (right %)": f"{cal.meta['n_samples']} ({100 * cal.meta['positives_rate']:.0f} %)",
                "LOO held-out ECE": cal.meta["ece_heldout"],
                "model": cal.meta["method"],
                "query acc": float(y.mean()),
                "ECE heuristic": expected_calibration_error(q["heuristic"], y),
                "ECE fallback": expected_calibration_error(q["fallback"], y),
                "ECE calibrated": expected_calibration_error(q["calibrated"], y),
                "acc@90% cov": accuracy_at_coverage(q["calibrated"], y, 0.9),
                "acc@50% cov": accuracy_at_coverage(q["calibrated"], y, 0.5),
                "acc@50% (heuristic)": accuracy_at_coverage(q["heuristic"], y, 0.5),
                "unrelated max: heuristic": float(un["heuristic"].max()),
                "fallback": float(un["fallback"].max()),
                "calibrated": float(un["calibrated"].max()),
            }
        )
        print(f"[{name}] exclude {ex_m:g} m: {rows[-1]} ({time.time() - t:.1f} s)", flush=True)
    store.close()
    return rows


COLUMNS = [
    "dataset",
    "db / queries",
    "exclude m",
    "LOO n (right %)",
    "LOO held-out ECE",
    "model",
    "query acc",
    "ECE heuristic",
    "ECE fallback",
    "ECE calibrated",
    "acc@90% cov",
    "acc@50% cov",
    "acc@50% (heuristic)",
    "unrelated max: heuristic",
    "fallback",
    "calibrated",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", type=Path, default=Path(os.environ.get("HAFLOC_SHARED_DATA", REPO.parent / "shared" / "data"))
    )
    ap.add_argument("--out", type=Path, default=Path("/tmp/hafloc-calibration-bench"))
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--max-side", type=int, default=192, help="longest image side for extraction (default 192)")
    ap.add_argument("--exclude-m", type=float, nargs="+", default=[0.0, 5.0])
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()
    t0 = time.time()
    rows = []
    for name in args.datasets:
        rows += run_dataset(name, args.data, args.out, args.max_side, args.exclude_m)
    table = markdown_table(rows, COLUMNS, floatfmt=".3f")
    print(table)
    if args.no_write:
        return
    section = f"""## Calibrated confidence (issue 11)

`python benchmarks/calibration.py` ({time.time() - t0:.0f} s with the descriptors cached in `--out`; a first run
also extracts ~3,300 images, about 7 minutes on 2 cores; untrained default HAF model, longest side {args.max_side} px).
Per dataset an index of the database images is calibrated by leave-one-out over itself
(`hafloc index calibrate --exclude-m R`), then the held-out queries are located (top 10, 25 m radius).
ECE (10 bins) of the old heuristic (agreement x margin), the uncalibrated fallback (heuristic x the
index's unrelated gate, as `locate` reports it) and the calibrated probability (gated too) on the
queries; accuracy of the most confident 90 % / 50 % of the queries; the highest confidence of an
unrelated photo (noise, grey, the other domain).
Targets: ECE <= 0.05 on held-out queries, unrelated <= 0.2. Small query sets make the ECE noisy
(GardensPoint: 20 queries, so one query moves it by up to 0.05). "not calibrated": leave-one-out found
too few right answers to fit (`hafloc index calibrate` refuses with that message; `index build` leaves
the index on the fallback; the default exclusion falls back from 5 m to 0 m by itself).

{table}

Reading it: every confidence here is gated by the index's unrelated similarity (the best similarity
blank and noise frames reach on it), as `locate` and `hafloc index calibrate` apply it. With this
untrained model the gate is too strict on ie_tower: flat dark frames match the dark stairwell frames
at a similarity no real match beats, so every answer is gated to 0 there (ECE = accuracy), calibrated
or not; on the outdoor sets it keeps unrelated photos at about 0.2 or below. The fixed ramp the fallback
used before (0 at cosine 0.5, 1 at 0.9) suited this untrained model better on GardensPoint+Lund but not
on the city, and gave the shipped trained model's right answers ~0 ("Uncalibrated confidence of the
default model"), which is why it went. The held-out-query target of 0.05 is met nowhere: leave-one-out
answers are not distributed like the queries (day vs night, other viewpoints), and no calibration of
retrieval features can see that shift. GardensPoint alone has fewer positioned photos than a calibration
needs (`hafloc index calibrate` refuses; `index build` leaves it on the fallback).
"""
    update_section("calibration", section)


if __name__ == "__main__":
    main()
