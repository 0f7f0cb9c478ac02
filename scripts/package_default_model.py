"""Make a trained model the shipped default: hafloc/descriptors/default/haf-streets.model.

Stores only what differs from the pretrained trunk of the backbone's package (head, whitening), in
float16 when its descriptors agree with float32 (cosine >= 0.999 on every parity image and the
same nearest neighbours), with the model card in its metadata; writes the file's sha256 into
hafloc/descriptors/modelfile.py (checked at every load) and, when only the card changed (same
weights), re-keys the calibration prior to the new file (else it says to refit the prior).

    python scripts/package_default_model.py runs/haf-streets/best.model \
        --card-json runs/bench-real/results-test.json --card runs/haf-streets-card-extra.json \
        --parity-images data/cambridge/images/val/queries
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hafloc.descriptors.extract import Extractor  # noqa: E402
from hafloc.descriptors.modelfile import DEFAULT_FILE, load_model, read_model_file, save_model  # noqa: E402
from hafloc.errors import InputError  # noqa: E402
from hafloc.images.io import list_images  # noqa: E402

MODELFILE = REPO / "hafloc" / "descriptors" / "modelfile.py"
MAX_BYTES = 15 * 2**20


def describe(model, paths: list[Path]) -> np.ndarray:
    return Extractor(model, backend="torch").extract_paths(paths, progress=False).descriptors


def card_metrics(results: Path | None, label: str) -> dict:
    """{set: {metric, model, untrained, vs_untrained}} from benchmarks/real_training.py's JSON."""
    if results is None:
        return {}
    rows = json.loads(results.read_text())["rows"]
    out = {}
    for row in rows:
        r = row["results"]
        if label in r:
            entry = {"metric": r[label]["metric"], "untrained": round(r["untrained"]["value"], 2)}
            for key, col in (("model", label), ("adapted", f"{label}+adapted"), ("as_built", f"{label}, as built")):
                if col in r:
                    entry[key] = round(r[col]["value"], 2)
                    if "vs_untrained" in r[col]:
                        entry[f"{key}_vs_untrained"] = r[col]["vs_untrained"]
            out[row["set"]] = entry
    return out


def run_card(model_path: Path) -> dict:
    """Card fields from the training run beside ``model_path``: data and split (each dataset's
    prepare.json), the command, seed, steps and the validation scores of the selected epoch."""
    run = model_path.parent
    cfg = json.loads((run / "config.json").read_text())
    meta = read_model_file(model_path).get("meta", {})
    trained = meta.get("trained", {})
    data, split = [], []
    for ds in cfg["dataset"].split(","):
        prep = Path(ds) / "prepare.json"
        if prep.is_file():
            p = json.loads(prep.read_text())
            n = p["images"]["train"]
            data.append(
                f"{p['source']} ({p['repository'].rsplit('/', 2)[-2] if '/' in p['repository'] else p['repository']}, "
                f"{p['revision']}): train split {n['database']} images of {p['places']['train']} places"
            )
            split.append(f"{p['source']}: seed {p['seed']}, bands {p['gap_m']:g} m apart; {p['protocol']}")
    flags = " ".join(
        f"--{k.replace('_', '-')} {'x'.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in cfg.items()
        if k
        in (
            "method",
            "dataset",
            "output",
            "image_size",
            "train_stages",
            "epochs",
            "max_queries_per_epoch",
            "cache_refresh",
            "lr",
            "patience",
            "seed",
            "select",
        )
    )
    return {
        "name": "haf-streets",
        "data": data,
        "split": split,
        "command": f"hafloc train {flags}",
        "seed": cfg["seed"],
        "selected": f"epoch {trained.get('epoch')} of {cfg['epochs']} by {cfg.get('select', 'recall@5')} "
        "(mean over the val sets, none below its start)",
        "iterations": (trained.get("epoch") or 0) * cfg["max_queries_per_epoch"] // cfg["batch_size"],
        "tuples_per_iteration": f"{cfg['batch_size']} x (query, positive, {cfg['num_negatives']} negatives)",
        "val": trained.get("val"),
        "trains": "head only (attention, projections, clusters, fusion weights); ImageNet trunk frozen",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="the trained model file (e.g. runs/haf-streets/best.model)")
    ap.add_argument("--card-json", type=Path, action="append", default=[], help="benchmark results (repeatable)")
    ap.add_argument("--label", default="default", help="the model's label in those results")
    ap.add_argument("--parity-images", nargs="+", required=True, help="images or folders for the float16 check")
    ap.add_argument("--card", type=Path, help="extra card fields (JSON object: data, split, command, ...)")
    args = ap.parse_args()

    model = load_model(args.model)
    meta = read_model_file(args.model).get("meta", {})
    paths = [p for p, _ in list_images(args.parity_images)][:48]
    DEFAULT_FILE.parent.mkdir(parents=True, exist_ok=True)
    card = {**run_card(args.model), **(json.loads(args.card.read_text()) if args.card else {})}
    metrics = {}
    for f in args.card_json:
        metrics.update(card_metrics(f, args.label))
    card["metrics"] = metrics
    tmp = DEFAULT_FILE.with_suffix(".check")
    try:  # the weights being replaced: the calibration prior was fitted on their descriptors
        before: str | None = load_model(None).fingerprint()
    except InputError:  # none yet, or damaged
        before = None
    full = describe(model, paths)
    half_ok = False
    save_model(model, tmp, meta={**meta, "card": card}, trunk="pretrained", half=True)
    half = describe(load_model(tmp), paths)
    cos = np.sum(full * half, axis=1)
    same_nn = (np.argsort(-(full @ full.T), axis=1)[:, 1] == np.argsort(-(half @ half.T), axis=1)[:, 1]).mean()
    half_ok = bool(cos.min() >= 0.999 and same_nn == 1.0)
    print(f"float16 parity on {len(paths)} images: min cosine {cos.min():.6f}, same nearest neighbour {same_nn:.3f}")
    card["storage"] = {
        "dtype": "float16" if half_ok else "float32",
        "parity_min_cosine": round(float(cos.min()), 6),
        "parity_images": len(paths),
    }
    save_model(model, DEFAULT_FILE, meta={**meta, "card": card}, trunk="pretrained", half=half_ok)
    tmp.unlink()
    after = load_model(DEFAULT_FILE).fingerprint()
    size = DEFAULT_FILE.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{DEFAULT_FILE}: {size / 2**20:.1f} MB, over the 15 MB the package allows")
    digest = hashlib.sha256(DEFAULT_FILE.read_bytes()).hexdigest()
    text = MODELFILE.read_text()
    MODELFILE.write_text(re.sub(r'DEFAULT_SHA256 = "[^"]*"', f'DEFAULT_SHA256 = "{digest}"', text, count=1))
    print(f"wrote {DEFAULT_FILE} ({size / 2**20:.2f} MB, {card['storage']['dtype']}), sha256 {digest}")
    carry_prior(before, after, digest)


def carry_prior(before: str | None, after: str, digest: str) -> None:
    """The calibration prior was fitted on the descriptors of the model it records: when only the
    card changed (same weights, same fingerprint) it stays valid and is re-keyed to the new file."""
    from hafloc.fileio import write_json_atomic
    from hafloc.index.calibrate import PRIOR_FILE

    if not PRIOR_FILE.is_file():
        return
    if before != after:
        print(f"the weights changed: rerun scripts/fit_calibration_prior.py ({PRIOR_FILE.name} is now ignored)")
        return
    doc = json.loads(PRIOR_FILE.read_text())
    write_json_atomic(PRIOR_FILE, {**doc, "model_sha256": digest})
    print(f"same weights (fingerprint {after}): {PRIOR_FILE.name} re-keyed to the new file")


if __name__ == "__main__":
    main()
