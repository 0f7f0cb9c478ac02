"""Fit the calibration prior shipped with the default model (hafloc/descriptors/default/calibration-prior.json).

For each street set's train split (``hafloc dataset prepare``), a seeded sample of its database
photos is indexed as ``hafloc index build`` does with the default model (adapted to the photos,
not calibrated), then every photo is located leave-one-out against the others (neighbours closer
than 5 m hidden, right = estimate within 25 m, top 10: ``index calibrate``'s defaults). A logistic
regression over the pooled answers is the prior that small indexes of the default model shrink
towards. Rerun after repackaging the default model (the prior records the model's sha256 and is
ignored when it no longer matches).

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
    samples, sets = [], {}
    for name in SETS:
        src = args.data / name / "images" / "train" / "database"
        if not src.is_dir():
            raise SystemExit(f"{src}: not found (run 'hafloc dataset prepare')")
        photos = sample_folder(src, args.work / f"{name}-photos", args.images, args.seed)
        index = args.work / f"{name}-index"
        Index.build(photos, index=index, calibrate=False, progress=True).close()
        with IndexStore.open(index) as store:
            s = C.leave_one_out(store, C.DEFAULT_AGREE_M, C.DEFAULT_EXCLUDE_M, C.DEFAULT_K, None, args.seed)
            sets[name] = {"images": len(store), "answers": len(s.labels), "right": round(float(s.labels.mean()), 4)}
        samples.append(s)
        print(name, sets[name], flush=True)
    model, report = C.fit_prior(samples, args.seed)
    write_json_atomic(
        args.output,
        {
            "format": C.PRIOR_FORMAT,
            "features_version": C.FEATURES_VERSION,
            "model_sha256": DEFAULT_SHA256,
            "agree_m": C.DEFAULT_AGREE_M,
            "exclude_m": C.DEFAULT_EXCLUDE_M,
            "k": C.DEFAULT_K,
            **report,
            "sets": sets,
            "command": f"python scripts/fit_calibration_prior.py --images {args.images} --seed {args.seed}",
            "created_at": time.strftime("%Y-%m-%d"),
            "base": model.to_json(),
        },
    )
    print(f"wrote {args.output}: {report}")


if __name__ == "__main__":
    main()
