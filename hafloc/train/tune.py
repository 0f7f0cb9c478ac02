"""Per-benchmark re-tuning of HAF's fusion weights w1..wL on a validation split (paper, Table 2).

The fused descriptor is concat_l sqrt(w_l) V_l with unit V_l, so its cosine is sum_l w_l cos_l:
the per-level descriptors are extracted ONCE, the per-level similarity matrices computed once,
and every grid point of the simplex is scored from their weighted sum.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..datasets.base import Dataset
from ..descriptors.network import GeoLocNet
from ..descriptors.runtime import Skipped, TorchRunner, run_batches
from ..errors import HaflocError, InputError
from ..fileio import write_json_atomic, write_text_atomic
from ..heads.multilevel import MultiLevelVLAD
from ..images.io import load_image, to_tensor
from ..metrics.protocols import score
from ..metrics.recall import recall_at_n

log = logging.getLogger(__name__)

NS = (1, 5, 10)


def simplex_grid(levels: int, step: float) -> list[tuple[float, ...]]:
    """All weight vectors with entries in multiples of ``step`` (1/step an integer) summing to 1."""
    n = int(round(1.0 / step))
    if n < 1 or abs(n * step - 1.0) > 1e-6:
        raise HaflocError(f"step must divide 1 (e.g. 0.1, 0.05), got {step}")
    out = []
    for combo in itertools.product(range(n + 1), repeat=levels - 1):
        rest = n - sum(combo)
        if rest >= 0:
            out.append(tuple(round(k / n, 10) for k in (*combo, rest)))
    return out


def extract_levels(
    model: GeoLocNet,
    paths: Sequence[Path],
    image_size: tuple[int, int] | None = None,
    max_side: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "levels",
) -> tuple[list[np.ndarray], list[int]]:
    """Per-level L2-normalised VLADs of ``paths``: ([(N_ok, D_l) per level] in path order, failed indices)."""
    model.eval()
    max_side = max_side or model.config.max_side

    def load(i: int) -> torch.Tensor:
        return to_tensor(load_image(paths[i]), size=image_size, max_side=max_side)

    rows: dict[int, list[np.ndarray]] = {}
    failed: list[int] = []
    runner = TorchRunner(model, outputs=("level_descriptors",))
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for ev in run_batches(runner, range(len(paths)), load, batch_size):
            if isinstance(ev, Skipped):
                log.warning("skipped %s", ev.error)
                failed.append(ev.item)
                bar.update(1)
                continue
            for j, i in enumerate(ev.items):
                rows[i] = [v[j] for v in ev.outputs["level_descriptors"]]
            bar.update(len(ev.items))
    ok = sorted(rows)
    per_level = [np.stack([rows[i][lv] for i in ok]) for lv in range(len(rows[ok[0]]))] if ok else []
    return per_level, sorted(failed)


def _fast_recall(ds: Dataset) -> bool:
    # plain recall sets can be ranked from a similarity matrix; protocol quirks go through score()
    return ds.metric == "recall" and ds.quirks.tokyo_nms is None and ds.quirks.timestamps is None


def _grid_scores(
    ds: Dataset, db_levels: list[np.ndarray], q_levels: list[np.ndarray], grid: list[tuple[float, ...]], progress: bool
) -> list[dict[str, float]]:
    results = []
    if _fast_recall(ds):
        sims = [torch.from_numpy(q) @ torch.from_numpy(d).T for q, d in zip(q_levels, db_levels)]
        positives = ds.query_positives()
        k = min(max(NS), ds.num_db)
        for w in tqdm(grid, desc="weights grid", disable=not progress, dynamic_ncols=True):
            s = sum(wl * sl for wl, sl in zip(w, sims))
            ranks = torch.topk(s, k, dim=1).indices.numpy().astype(np.int64)
            r = recall_at_n(ranks, positives, NS)
            results.append({f"recall@{n}": float(v) for n, v in r.items()})
    else:
        for w in tqdm(grid, desc="weights grid", disable=not progress, dynamic_ncols=True):
            fused_db = np.concatenate([math.sqrt(wl) * d for wl, d in zip(w, db_levels)], axis=1)
            fused_q = np.concatenate([math.sqrt(wl) * q for wl, q in zip(w, q_levels)], axis=1)
            scored = score(ds, fused_db, fused_q, ns=NS)
            key = [k for k in ("recall@1", "recall@5", "recall@10", "mAP") if k in scored]
            results.append({k: float(scored[k]) for k in key})
    return results


def pick_best(grid: list[tuple[float, ...]], results: list[dict[str, float]], target: str = "recall@5") -> int:
    """Index of the best grid point: highest ``target``; ties -> closest to uniform, then highest recall@1."""
    levels = len(grid[0])
    uniform = np.full(levels, 1.0 / levels)

    def key(i: int) -> tuple:
        r = results[i]
        dist = float(np.linalg.norm(np.asarray(grid[i]) - uniform))
        return (-round(r.get(target, r.get("mAP", 0.0)), 9), round(dist, 9), -round(r.get("recall@1", 0.0), 9), i)

    return min(range(len(grid)), key=key)


def tune_fusion_weights(
    model: GeoLocNet,
    ds: Dataset,
    step: float = 0.1,
    image_size: tuple[int, int] | None = None,
    max_side: int | None = None,
    batch_size: int = 8,
    apply: bool = True,
    whitening_paths: Sequence[Path] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Grid-search the fusion weights on ``ds`` for the best recall@5 (mAP for mAP sets).

    Returns {"dataset", "weights", "recall@1", "recall@5", ..., "previous_weights", "previous"
    (scores at the model's current weights), "grid": [{"w", scores}], "step", "whitening"}.
    With ``apply`` the best weights are set in ``model.head``. A model with whitening was fitted
    on descriptors of the old weights: it is refitted on ``whitening_paths`` when given, else
    left as is and reported as ``"whitening": "stale"`` (a warning is logged).
    """
    head = model.head
    if not isinstance(head, MultiLevelVLAD) or len(head.levels) < 2:
        raise HaflocError(f"method {model.config.method!r} has a single level: no fusion weights to tune")
    if ds.num_q == 0 or ds.num_db == 0:
        raise HaflocError(f"{ds.name}: nothing to tune on ({ds.num_db} database, {ds.num_q} query images)")
    db_levels, db_fail = extract_levels(
        model, ds.db_paths(), image_size, max_side, batch_size, progress, "tune: database"
    )
    q_levels, q_fail = extract_levels(model, ds.q_paths(), image_size, max_side, batch_size, progress, "tune: queries")
    if db_fail or q_fail:
        ds = ds.subset(
            db_idx=np.setdiff1d(np.arange(ds.num_db), db_fail), q_idx=np.setdiff1d(np.arange(ds.num_q), q_fail)
        )
    grid = simplex_grid(len(head.levels), step)
    previous = [round(float(w), 6) for w in head.fusion_weights().detach()]
    results = _grid_scores(ds, db_levels, q_levels, grid, progress)
    prev_scores = _grid_scores(ds, db_levels, q_levels, [tuple(previous)], progress=False)[0]
    best = pick_best(grid, results)
    weights = list(grid[best])
    out: dict[str, Any] = {
        "dataset": ds.name,
        "weights": weights,
        **results[best],
        "previous_weights": previous,
        "previous": prev_scores,
        "step": step,
        "num_queries": ds.num_q,
        "num_db": ds.num_db,
        "skipped": len(db_fail) + len(q_fail),
        "grid": [{"w": list(w), **r} for w, r in zip(grid, results)],
    }
    out["whitening"] = None
    if apply:
        head.set_fusion_weights(weights)
        if model.whitening.dim:
            if whitening_paths:
                from ..descriptors.fit import fit_whitening

                fit_whitening(model, list(whitening_paths), model.whitening.dim, progress=progress)
                out["whitening"] = "refitted"
            else:
                log.warning(
                    "the model's whitening was fitted with the old fusion weights and is now stale; "
                    "refit it on training images (hafloc.descriptors.fit.fit_whitening)"
                )
                out["whitening"] = "stale"
    return out


def table_row(result: dict[str, Any]) -> dict[str, Any]:
    """One Table-2 row: dataset, w1..wL, recall@1, recall@5."""
    row: dict[str, Any] = {"dataset": result["dataset"]}
    for i, w in enumerate(result["weights"], start=1):
        row[f"w{i}"] = round(float(w), 4)
    for k in ("recall@1", "recall@5"):
        row[k] = round(float(result.get(k, float("nan"))), 2)
    return row


def write_weights_table(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Add ``result``'s row to the table in ``out_dir`` (weights.json / weights.md / weights.png).

    Rows of other datasets already in ``weights.json`` are kept (one row per dataset), so
    running the tuning on several benchmarks builds the paper's Table 2.
    """
    from ..reports import markdown_table, plot_weights_table

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "weights.json"
    rows: list[dict[str, Any]] = []
    grids: dict[str, Any] = {}
    if js.exists():
        try:
            old = json.loads(js.read_text())
            rows, grids = list(old["rows"]), dict(old.get("grids", {}))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise InputError(js, f"not a weights table ({err})") from None
    row = table_row(result)
    rows = [r for r in rows if r.get("dataset") != row["dataset"]] + [row]
    columns = ["dataset", *[f"w{i}" for i in range(1, len(result["weights"]) + 1)], "recall@1", "recall@5"]
    grids[row["dataset"]] = result["grid"]
    write_json_atomic(js, {"rows": rows, "grids": grids})
    write_text_atomic(out_dir / "weights.md", markdown_table(rows, columns) + "\n")
    png = plot_weights_table(rows, out_dir / "weights.png", columns=columns)
    return {"json": js, "markdown": out_dir / "weights.md", "png": Path(png)}
