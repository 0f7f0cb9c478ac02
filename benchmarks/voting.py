"""Where is the photo? The place with the most similarity mass vs the single most similar match.

For every query of the street sets (``hafloc dataset prepare``; val splits for the choice of the
vote temperature, test splits to report), the global top K matches go through
``hafloc.index.locate.estimate_position`` as ``hafloc locate`` runs it, and the answer counts as right
when the estimate lies within 25 m of the query's true position (what a user reads, and what
``index calibrate`` labels). "top match" is the rule before voting: the most similar match anchors,
positions averaged with votes at temperature 0.05 (obtained by giving each match its similarity as
score, which anchors on the best one). Models: the untrained HAF (clusters fitted on the set's
database) and the shipped default as ``index build`` gives it (adapted: every set here has >= 25
database photos). SF night scores queries only against other capture months (its protocol).
Intervals: paired bootstrap 95% of the difference to "top match" over queries.

    python benchmarks/voting.py --split val   # choose
    python benchmarks/voting.py --split test --write
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import numpy as np

from hafloc.datasets.detect import load_dataset
from hafloc.datasets.geo import haversine_m, utm_to_latlon
from hafloc.descriptors.modelfile import load_model
from hafloc.index.locate import VOTE_TEMPERATURE, estimate_position
from hafloc.index.store import Match
from hafloc.metrics.evaluate import ExtractionSettings, extract_dataset
from hafloc.metrics.stats import paired_bootstrap
from mdsection import update_section
from real_training import REPO, STREETS, adapted_for, build_set, untrained_for

RADIUS_M = 25.0
TEMPERATURES = (0.01, 0.02, 0.03, 0.05)


def similarities(ds, model_path: Path, work: Path) -> np.ndarray:
    """(Nq, Ndb) cosine similarities; pairs the set's protocol excludes (same capture month) at -inf."""
    res = extract_dataset(
        load_model(model_path), ds, ExtractionSettings(backend="auto"), cache_dir=work / "cache", progress=False
    )
    assert len(res.db_ok) == ds.num_db and len(res.q_ok) == ds.num_q, "every image of the street sets loads"
    sim = res.q @ res.db.T
    ts = ds.quirks.timestamps
    if ts is not None:
        sim[np.asarray(ts["q"])[:, None] == np.asarray(ts["db"])[None]] = -np.inf
    return sim


def right_answers(ds, sim: np.ndarray, k: int, temperature: float | None) -> np.ndarray:
    """1 where the estimate from the top ``k`` lies within 25 m of the query; ``None``: "top match"."""
    assert ds.db_utm is not None and ds.q_utm is not None and ds.utm_zone is not None
    zone, letter = ds.utm_zone
    db_lat, db_lon = utm_to_latlon(ds.db_utm[:, 0], ds.db_utm[:, 1], zone, letter)
    q_lat, q_lon = utm_to_latlon(ds.q_utm[:, 0], ds.q_utm[:, 1], zone, letter)
    out = np.zeros(len(sim))
    for i, row in enumerate(sim):
        top = np.argsort(-row, kind="stable")[:k]
        ms = [
            Match(
                id=int(j),
                image=ds.db_images[j],
                root="",
                similarity=float(row[j]),
                lat=float(db_lat[j]),
                lon=float(db_lon[j]),
            )
            for j in top
        ]
        if temperature is None:
            est = estimate_position([dataclasses.replace(m, score=m.similarity) for m in ms], vote_temperature=0.05)
        else:
            est = estimate_position(ms, vote_temperature=temperature)
        out[i] = est is not None and haversine_m(est.lat, est.lon, q_lat[i], q_lon[i]) <= RADIUS_M
    return out


def run(split: str, data: Path, work: Path, ks: list[int]) -> list[str]:
    head = ["set", "model", "K", "queries", "top match", *(f"vote T = {t:g}" for t in TEMPERATURES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in STREETS:
        root = build_set(name, work, data, split)
        if root is None:
            print(f"{name}: not found under {data} (run 'hafloc dataset prepare'), skipped", file=sys.stderr)
            continue
        ds = load_dataset(root, split=split)
        models = {
            "untrained": untrained_for(ds, work / "models" / f"untrained-{name}-{split}.model"),
            "default, as built": adapted_for("default", ds, work / "models" / f"default-{name}-{split}.model"),
        }
        for label, path in models.items():
            sim = similarities(ds, path, work)
            for k in ks:
                base = right_answers(ds, sim, k, None)
                cells = [f"{100 * base.mean():.1f}"]
                for t in TEMPERATURES:
                    hits = right_answers(ds, sim, k, t)
                    iv = paired_bootstrap(hits, base).format(scale=100)
                    cell = f"{100 * hits.mean():.1f} ({iv})"
                    cells.append(f"**{cell}**" if t == VOTE_TEMPERATURE else cell)
                lines.append(f"| {name}-{split} | {label} | {k} | {ds.num_q} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="test", help="split of the street sets (val for the choice, test to report)")
    ap.add_argument("--k", type=int, nargs="+", default=[5, 10, 20], help="matches the estimate is made from")
    ap.add_argument("--data", type=Path, default=REPO / "data", help="where 'hafloc dataset prepare' wrote the sets")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-real")
    ap.add_argument("--write", action="store_true", help="record the table in BENCHMARKS.md")
    args = ap.parse_args()
    lines = run(args.split, args.data, args.work, args.k)
    if args.write:
        update_section(
            f"voting-{args.split}",
            f"## Spatial voting: which place answers (`benchmarks/voting.py --split {args.split}`)\n\n"
            f"Share of queries whose estimate lies within {RADIUS_M:g} m of the truth ({args.split} splits), "
            'global search only; in brackets the paired 95% bootstrap interval of the difference to "top '
            'match" (the most similar match anchors). Bold: the shipped vote temperature '
            f"(`VOTE_TEMPERATURE` = {VOTE_TEMPERATURE:g}, chosen on the val splits). {platform.machine()}, "
            f"{time.strftime('%Y-%m-%d')}.\n\n" + "\n".join(lines) + "\n",
        )


if __name__ == "__main__":
    main()
