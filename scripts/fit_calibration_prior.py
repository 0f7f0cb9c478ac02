"""Fit the calibration prior shipped with the default model (hafloc/descriptors/default/calibration-prior.json).

For each street set's train split (``hafloc dataset prepare``), a seeded sample of its database
photos is indexed as ``hafloc index build`` does with the default model (adapted to the photos,
xfeat local features, not calibrated), then every photo is located leave-one-out against the
others (neighbours closer than 5 m hidden, right = estimate within 25 m, top 10: ``index
calibrate``'s defaults), once by global search (the "global" prior) and, for at most 500 photos
per set, re-ranked by verified xfeat matches with the shipped scorer (the "reranked" prior, with
its inliers model). Logistic regressions over the pooled answers are the priors that small
indexes of the default model shrink towards. Rerun after repackaging the default model (the prior
records the model's sha256 and is ignored when it no longer matches).

    python scripts/fit_calibration_prior.py --data data --images 800
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hafloc.api import Index  # noqa: E402
from hafloc.descriptors.modelfile import DEFAULT_SHA256  # noqa: E402
from hafloc.fileio import write_json_atomic  # noqa: E402
from hafloc.images.io import list_images  # noqa: E402
from hafloc.index import calibrate as C  # noqa: E402
from hafloc.index.store import IndexStore  # noqa: E402

SETS = ("cambridge", "sfnight")


def sample_folder(src: Path, out: Path, n: int, seed: int) -> Path:
    """``out`` holding links to a seeded sample of ``n`` photos of ``src`` (their '@' names keep the positions)."""
    photos = sorted(f for f, _ in list_images([src]))
    pick = sorted(np.random.default_rng(seed).permutation(len(photos))[:n])
    out.mkdir(parents=True, exist_ok=True)
    for i in pick:
        link = out / photos[i].name
        if not link.exists():
            link.symlink_to(photos[i].resolve())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / "data", help="where 'hafloc dataset prepare' wrote the sets")
    ap.add_argument("--images", type=int, default=800, help="database photos sampled per set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "calibration-prior")
    ap.add_argument("--output", type=Path, default=C.PRIOR_FILE)
    args = ap.parse_args()
    from hafloc.index.rerank import RERANK_CALIBRATION_SAMPLES, LooReranker, Reranker

    samples: dict[str, list] = {"global": [], "reranked": []}
    sets = {}
    for name in SETS:
        src = args.data / name / "images" / "train" / "database"
        if not src.is_dir():
            raise SystemExit(f"{src}: not found (run 'hafloc dataset prepare')")
        photos = sample_folder(src, args.work / f"{name}-photos", args.images, args.seed)
        index = args.work / f"{name}-index-xfeat"
        Index.build(photos, index=index, local="xfeat", calibrate=False, progress=True).close()
        with IndexStore.open(index) as store:
            loo = (C.DEFAULT_AGREE_M, C.DEFAULT_EXCLUDE_M, C.DEFAULT_K)
            s = C.leave_one_out(store, *loo, None, args.seed)
            local = store.local_config or {}
            hook = LooReranker(store, Reranker(local["extractor"], local.get("conf")), C.DEFAULT_K, C.DEFAULT_AGREE_M)
            r = C.leave_one_out(store, *loo, RERANK_CALIBRATION_SAMPLES, args.seed, rerank=hook)
            sets[name] = {
                "images": len(store),
                "global": {"answers": len(s.labels), "right": round(float(s.labels.mean()), 4)},
                "reranked": {"answers": len(r.labels), "right": round(float(r.labels.mean()), 4)},
            }
        samples["global"].append(s)
        samples["reranked"].append(r)
        print(name, sets[name], flush=True)
    report = {key: C.fit_prior(parts, args.seed) for key, parts in samples.items()}
    write_json_atomic(
        args.output,
        {
            "format": C.PRIOR_FORMAT,
            "features_version": C.FEATURES_VERSION,
            "model_sha256": DEFAULT_SHA256,
            "agree_m": C.DEFAULT_AGREE_M,
            "exclude_m": C.DEFAULT_EXCLUDE_M,
            "k": C.DEFAULT_K,
            "sets": sets,
            "command": f"python scripts/fit_calibration_prior.py --images {args.images} --seed {args.seed}",
            "created_at": time.strftime("%Y-%m-%d"),
            **report,
        },
    )
    print(f"wrote {args.output}: " + str({k: {n: v for n, v in e.items() if "ece" in n} for k, e in report.items()}))


if __name__ == "__main__":
    main()
