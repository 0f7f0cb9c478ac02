"""The demo pipeline: synthetic city -> train every method -> tune HAF's weights -> evaluate on
test -> report.

Like hloc, stages talk through files on disk. Each stage writes its output atomically together
with a marker (JSON) holding a digest of its inputs; a rerun skips every stage whose marker
matches, so a crash loses only the stage in flight, and an interrupted training run resumes from
its last checkpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

import numpy as np

from ..datasets.base import Dataset
from ..datasets.detect import load_dataset
from ..datasets.synthetic import read_meta
from ..descriptors.modelfile import DEFAULT, load_model, save_model
from ..errors import HaflocError
from ..fileio import write_json_atomic
from ..heads import LABELS
from ..synth import generate_city
from .config import DemoConfig, digest

if TYPE_CHECKING:
    from ..metrics.evaluate import EvalResult

log = logging.getLogger(__name__)

MARK = "demo-stage.json"
TOP_STORED = 10  # retrievals kept per query in the result files


# ----------------------------------------------------------------------------- stage log


@dataclass
class StageLog:
    """Numbered stage lines on ``stream`` ("[3/9] training netvlad ... 41 s") and their timings."""

    total: int
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    records: list[dict[str, Any]] = field(default_factory=list)

    def run(self, name: str, fn: Callable[[], tuple[Any, bool]]) -> Any:
        """Run ``fn`` (returning ``(value, reused)``) as the next stage; log and time it."""
        i = len(self.records) + 1
        tag = f"[{i}/{self.total}] {name}"
        print(f"{tag} ...", file=self.stream, flush=True)
        t0 = time.perf_counter()
        value, reused = fn()
        sec = time.perf_counter() - t0
        status = "reused" if reused else "done"
        print(
            f"{tag} ... {_fmt_seconds(sec)}" + (" (reused: finished earlier)" if reused else ""),
            file=self.stream,
            flush=True,
        )
        self.records.append({"stage": name, "seconds": round(sec, 1), "status": status})
        return value


def _fmt_seconds(sec: float) -> str:
    return f"{sec:.0f} s" if sec < 120 else f"{int(sec // 60)} min {sec % 60:.0f} s"


# ----------------------------------------------------------------------------- markers


def read_mark(folder: Path, key: str) -> dict[str, Any] | None:
    """The marker of a finished stage in ``folder`` when its input digest is ``key``."""
    try:
        mark = json.loads((folder / MARK).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) and mark.get("key") == key else None


def write_mark(folder: Path, key: str, info: dict[str, Any]) -> dict[str, Any]:
    mark = {"key": key, **info}
    write_json_atomic(folder / MARK, mark)
    return mark


# ----------------------------------------------------------------------------- stages


def stage_data(cfg: DemoConfig, root: Path) -> tuple[Path, bool]:
    """The synthetic city in ``root`` (generation is itself idempotent and atomic)."""
    city = cfg.city_config()
    try:
        reused = read_meta(root).get("config") == city.to_json()
    except HaflocError:
        reused = False
    generate_city(root, city, progress=cfg.progress)
    return root, reused


def train_config(cfg: DemoConfig, method: str, data_root: Path, run_dir: Path, seed: int | None = None):
    """The TrainConfig of one method in the demo (GPS supervision on the city's '@' folders);
    ``seed``: the training seed (default ``cfg.seed``, the city's)."""
    from ..train.config import TrainConfig

    return TrainConfig(
        method=method,
        dataset=str(data_root),
        output=str(run_dir),
        format="at",
        epochs=cfg.epochs,
        image_size=cfg.image_size,
        clusters=cfg.clusters,
        proj_dim=cfg.proj_dim if method == "haf" else None,
        fit_images=cfg.fit_images,
        train_stages=cfg.train_stages,
        supervision="gps",
        num_negatives=cfg.num_negatives,
        neg_pool=cfg.neg_pool,
        cache_refresh=cfg.cache_refresh,
        lr=cfg.lr,
        head_lr=cfg.head_lr,
        batch_size=cfg.batch_size,
        patience=0,
        seed=cfg.seed if seed is None else seed,
        time_budget=cfg.train_minutes,
        cache_images="yes",
        progress=cfg.progress,
    )


def _train_key(tcfg: Any, cfg: DemoConfig) -> str:
    d = tcfg.to_dict()
    for k in ("output", "progress", "workers", "dataset"):
        d.pop(k, None)
    return digest({"train": d, "city": cfg.city})


def fit_fresh_model(cfg: DemoConfig, method: str, data_root: Path):
    """``method`` on the pretrained backbone with clusters fitted on the training database: the
    exact starting point of training (same images, same seed)."""
    from ..descriptors.fit import fit_clusters
    from ..descriptors.network import GeoLocNet, ModelConfig

    mcfg = ModelConfig.for_method(
        method, None, num_clusters=cfg.clusters, proj_dim=cfg.proj_dim if method == "haf" else None
    )
    mcfg.max_side = max(cfg.image_size)
    model = GeoLocNet(mcfg, pretrained=True)
    db_paths = load_dataset(data_root, "at", split="train").db_paths()
    rng = np.random.default_rng(cfg.seed)
    pick = np.sort(rng.choice(len(db_paths), min(cfg.fit_images, len(db_paths)), replace=False))
    info = fit_clusters(
        model, [db_paths[i] for i in pick], seed=cfg.seed, max_side=mcfg.max_side, progress=cfg.progress
    )
    return model.eval(), info


def stage_train(
    cfg: DemoConfig, method: str, data_root: Path, run_dir: Path, init_path: Path | None = None, seed: int | None = None
) -> tuple[dict[str, Any], bool]:
    """Train ``method`` into ``run_dir`` (best.model, history.csv/png); resume a crashed run.

    ``init_path``: also save the model as initialised, before any training step (the untrained
    reference row costs no second fit).
    """
    from ..train.loop import Trainer

    tcfg = train_config(cfg, method, data_root, run_dir, seed=seed)
    key = _train_key(tcfg, cfg)
    mark = read_mark(run_dir, key)
    if mark and (run_dir / "best.model").is_file():
        return mark, True
    resume = False
    if (run_dir / "last.ckpt").is_file():
        try:
            old = json.loads((run_dir / "config.json").read_text())
            resume = _train_key(type(tcfg).from_dict(old), cfg) == _train_key(tcfg, cfg)
        except (OSError, ValueError, HaflocError, TypeError):
            resume = False
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # a run of other settings: start over
    if resume:
        log.info("resuming the %s training run in %s", method, run_dir)
    trainer = Trainer(tcfg, resume=resume)
    if init_path is not None and not resume:
        save_untrained(cfg, method, trainer.model, trainer.fit_info, init_path)
    summary = trainer.run()
    summary = {k: v for k, v in summary.items() if k not in ("rank", "output")}
    return write_mark(run_dir, key, {"method": method, "trained": True, "resumed": resume, "summary": summary}), False


def _untrained_key(cfg: DemoConfig, method: str) -> str:
    return digest(
        {
            "method": method,
            "clusters": cfg.clusters,
            "proj_dim": cfg.proj_dim,
            "image_size": cfg.image_size,
            "fit_images": cfg.fit_images,
            "seed": cfg.seed,
            "city": cfg.city,
        }
    )


def save_untrained(cfg: DemoConfig, method: str, model: Any, fit_info: dict[str, Any], path: Path) -> dict[str, Any]:
    save_model(model, path, meta={"fit": fit_info, "trained": None})
    mark = {"key": _untrained_key(cfg, method), "method": method, "trained": False}
    write_json_atomic(path.parent / f"{path.stem}.{MARK}", mark)  # after the model: marks it complete
    return mark


def stage_untrained(cfg: DemoConfig, method: str, data_root: Path, path: Path) -> tuple[dict[str, Any], bool]:
    """``method`` initialised but never trained (the reference row); usually saved by its training
    stage already, else fitted here (same images, same seed as training's start)."""
    try:
        mark = json.loads((path.parent / f"{path.stem}.{MARK}").read_text())
        if mark.get("key") == _untrained_key(cfg, method) and path.is_file():
            return mark, True
    except (OSError, ValueError):
        pass
    model, info = fit_fresh_model(cfg, method, data_root)
    return save_untrained(cfg, method, model, info, path), False


def stage_tune(
    cfg: DemoConfig, model_path: Path, data_root: Path, out_path: Path
) -> tuple[dict[str, Any] | None, bool]:
    """Tune HAF's fusion weights on val (recall@5, simplex grid) and save the tuned model."""
    try:
        from ..train.tune import tune_fusion_weights
    except ImportError as err:
        log.warning("weight tuning unavailable (%s): HAF keeps its learned weights", err)
        return None, False
    model = load_model(model_path)
    key = digest({"model": model.fingerprint(), "step": cfg.tune_step, "image_size": cfg.image_size, "city": cfg.city})
    json_path = out_path.with_suffix(".json")
    try:
        done = json.loads(json_path.read_text())
        if done.get("key") == key and out_path.is_file():
            return done, True
    except (OSError, ValueError):
        pass
    val = load_dataset(data_root, "at", split="val")
    res = tune_fusion_weights(model, val, step=cfg.tune_step, image_size=cfg.image_size, progress=cfg.progress)
    res = {"key": key, "model": str(model_path), **res}
    save_model(model, out_path, meta={**model.meta, "tuned": {k: v for k, v in res.items() if k != "grid"}})
    write_json_atomic(json_path, res)  # after the model: its presence means the stage finished
    return res, False


def query_table(root: Path) -> dict[str, dict[str, Any]]:
    """Query file (relative to the city root) -> its meta entry (size, condition, landmark_fraction)."""
    meta = read_meta(root)
    return {q["file"]: q for split in meta["splits"].values() for q in split.get("queries", [])}


def _rel(ds: Dataset, rel: str, root: Path) -> str:
    return Path(ds.root, rel).resolve().relative_to(root.resolve()).as_posix()


def per_query(result: EvalResult, ds: Dataset, root: Path, queries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per test query: its top retrievals (files relative to ``root``), right/wrong,
    distance, and the 0-based rank of the first right one (None: not in the stored top)."""
    ds_ok: Dataset = result.dataset
    ranks = np.asarray(result.ranks)
    positives = ds_ok.query_positives()
    by_row = {int(q): i for i, q in enumerate(result.q_index)}
    out = []
    for qi, rel in enumerate(ds.q_images):
        qrel = _rel(ds, rel, root)
        info = queries.get(qrel, {})
        rec: dict[str, Any] = {
            "query": qrel,
            "size": info.get("size"),
            "condition": info.get("condition"),
            "top": [],
            "correct": [],
            "dist_m": [],
            "first_hit": None,
        }
        row = by_row.get(qi)
        if row is not None:
            pos = set(int(p) for p in positives[row])
            for r, d in enumerate(ranks[row][:TOP_STORED]):
                if d < 0:
                    break
                rec["top"].append(_rel(ds_ok, ds_ok.db_images[d], root))
                rec["correct"].append(int(d) in pos)
                if ds_ok.db_utm is not None and ds_ok.q_utm is not None:
                    rec["dist_m"].append(round(float(np.linalg.norm(ds_ok.db_utm[d] - ds_ok.q_utm[row])), 1))
            hits = [r for r, d in enumerate(ranks[row]) if d >= 0 and int(d) in pos]
            rec["first_hit"] = hits[0] if hits else None
        out.append(rec)
    return out


def recall_by_group(
    records: list[dict[str, Any]], key: str = "size", ns: tuple[int, ...] = (1, 5, 10)
) -> dict[str, Any]:
    """Recall@N (percent) per value of ``records[i][key]``; a query with no stored hit is a miss."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(str(r.get(key)), []).append(r)
    out = {}
    for g, rs in groups.items():
        out[g] = {
            f"recall@{n}": 100.0 * sum(r["first_hit"] is not None and r["first_hit"] < n for r in rs) / len(rs)
            for n in ns
        }
        out[g]["num_queries"] = len(rs)
    return out


def stage_evaluate(
    cfg: DemoConfig, name: str, model_path: Path, ds: Dataset, root: Path, out_dir: Path, extra: dict[str, Any]
) -> tuple[dict[str, Any], bool]:
    """Evaluate one model on the test split (descriptors cached in ``DIR/cache``) -> results/NAME.json."""
    from ..metrics.evaluate import ExtractionSettings, evaluate

    model = load_model(model_path)
    settings = ExtractionSettings(batch_size=8, backend=cfg.backend, image_size=cfg.image_size)
    key = digest(
        {
            "model": model.fingerprint(),
            "image_size": cfg.image_size,
            "backend": cfg.backend,
            "city": cfg.city,
            "ds": ds.summary(),
            "extra": extra,
        }
    )
    path = out_dir / "results" / f"{name}.json"
    try:
        done = json.loads(path.read_text())
        if done.get("key") == key:
            return done, True
    except (OSError, ValueError):
        pass
    res = evaluate(model, ds, settings, cache_dir=out_dir / "cache", progress=cfg.progress)
    records = per_query(res, ds, root, query_table(root))
    out = {
        "key": key,
        "name": name,
        "model": str(model_path.relative_to(out_dir)) if model_path.is_relative_to(out_dir) else str(model_path),
        "fingerprint": res["fingerprint"],
        "descriptor_dim": res["descriptor_dim"],
        **{k: float(res[k]) for k in ("recall@1", "recall@5", "recall@10")},
        "recall_curve": res["recall_curve"],
        "by_size": recall_by_group(records),
        "by_condition": recall_by_group(records, "condition"),
        "fusion_weights": [round(float(w), 4) for w in model.head.fusion_weights().detach()]
        if len(model.head.levels) > 1
        else None,
        "timing": res["timing"],
        "failures": res["failures"],
        **extra,
        "queries": records,
    }
    write_json_atomic(path, out)
    return out, False


def seed_summary(
    cfg: DemoConfig, seed_results: dict[str, list[dict[str, Any]]], n_boot: int = 10_000
) -> dict[str, Any]:
    """Per method: recall@1/@5 (overall and by landmark size) as mean +- std over the seeds; and
    HAF (as reported: tuned w when tuned) minus the best baseline (by mean recall@1) as a paired
    bootstrap interval over the test queries, each method's seeds pooled per query."""
    from ..datasets.synthetic import SIZE_CLASSES
    from ..metrics.stats import hits_at, mean_std, paired_bootstrap

    out: dict[str, Any] = {"seeds": [cfg.seed + i for i in range(cfg.seeds)], "methods": {}}
    for m, rs in seed_results.items():
        e: dict[str, Any] = {
            "label": rs[0]["label"],
            **{k: mean_std([r[k] for r in rs]).to_json() for k in ("recall@1", "recall@5")},
            "per_seed": [{k: r[k] for k in ("recall@1", "recall@5")} for r in rs],
        }
        e["by_size"] = {
            z: mean_std([r["by_size"][z]["recall@1"] for r in rs if z in r["by_size"]]).to_json()
            for z in SIZE_CLASSES
            if any(z in r["by_size"] for r in rs)
        }
        out["methods"][m] = e
    base = [m for m in seed_results if m != "haf"]
    if "haf" in seed_results and base:
        best = max(base, key=lambda m: (out["methods"][m]["recall@1"]["mean"], out["methods"][m]["recall@5"]["mean"]))

        def hits(m: str, n: int) -> np.ndarray:
            return np.stack([hits_at([q["first_hit"] for q in r["queries"]], n) for r in seed_results[m]])

        out["haf_vs_best_baseline"] = {
            "baseline": best,
            **{
                f"recall@{n}": paired_bootstrap(hits("haf", n), hits(best, n), n_boot=n_boot, seed=cfg.seed).to_json()
                for n in (1, 5)
            },
        }
    return out


# ----------------------------------------------------------------------------- the run


@dataclass
class Evaluation:
    """A row of the results table: which model file, and how it came about."""

    name: str
    label: str
    method: str
    model: Path
    trained: bool
    note: str = ""


def run_demo(cfg: DemoConfig, stream: TextIO | None = None) -> dict[str, Any]:
    """Run (or finish) the whole demo into ``cfg.output``; returns the results dict (also
    written to ``results.json``) after writing ``index.html``."""
    from .report import write_demo_report

    cfg.validate()
    t_start = time.perf_counter()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    data_root, runs = out / "data", out / "runs"
    has_haf = "haf" in cfg.methods
    n_eval = len(cfg.methods) + (3 if has_haf else 0)
    per_seed = 2 * len(cfg.methods) + (1 if has_haf else 0)  # train + evaluate each method, tune HAF
    total = 1 + len(cfg.methods) + (2 if has_haf else 0) + n_eval + (cfg.seeds - 1) * per_seed + 1
    stages = StageLog(total, stream or sys.stderr)
    write_json_atomic(out / "config.json", {"demo": cfg.to_dict(), "status": "running"})

    stages.run("synthetic city", lambda: stage_data(cfg, data_root))
    trained: dict[str, dict[str, Any]] = {}
    untrained_path = out / "models" / "haf-untrained.model"
    for m in cfg.methods:
        trained[m] = stages.run(
            f"training {m}",
            functools.partial(
                stage_train, cfg, m, data_root, runs / m, init_path=untrained_path if m == "haf" else None
            ),
        )
    tuned = None
    if has_haf:
        stages.run("haf untrained (reference)", lambda: stage_untrained(cfg, "haf", data_root, untrained_path))
        tuned = stages.run(
            "tuning haf fusion weights on val",
            lambda: stage_tune(cfg, runs / "haf" / "best.model", data_root, runs / "haf" / "tuned.model"),
        )

    evals = []
    for m in cfg.methods:
        is_trained = bool(trained[m].get("trained"))
        label = LABELS[m] + ("" if is_trained else " (untrained)")
        if m == "haf" and tuned is not None:
            evals.append(
                Evaluation(
                    "haf",
                    label + ", tuned w",
                    m,
                    runs / m / "tuned.model",
                    is_trained,
                    "trained, fusion weights tuned on val",
                )
            )
        else:
            evals.append(
                Evaluation(
                    m,
                    label,
                    m,
                    runs / m / "best.model",
                    is_trained,
                    "trained" if is_trained else "initialised only (no training)",
                )
            )
    if has_haf:
        if tuned is not None:
            evals.append(
                Evaluation(
                    "haf-learned",
                    LABELS["haf"] + (", learned w" if trained["haf"].get("trained") else " (untrained), uniform w"),
                    "haf",
                    runs / "haf" / "best.model",
                    bool(trained["haf"].get("trained")),
                    "before tuning: the weights training learned",
                )
            )
        evals.append(
            Evaluation(
                "haf-untrained",
                "HAF (untrained)",
                "haf",
                out / "models" / "haf-untrained.model",
                False,
                "pretrained backbone, k-means clusters, uniform weights",
            )
        )
        evals.append(
            Evaluation(
                "haf-default",
                "HAF (shipped default)",
                "haf",
                Path(DEFAULT),
                True,
                "the model hafloc ships: trained on real street views, never on this city",
            )
        )

    test = load_dataset(data_root, "at", split="test")
    results: dict[str, dict[str, Any]] = {}
    for ev in evals:
        extra = {"label": ev.label, "method": ev.method, "trained": ev.trained, "note": ev.note}
        results[ev.name] = stages.run(
            f"evaluating {ev.name} on test",
            functools.partial(stage_evaluate, cfg, ev.name, ev.model, test, data_root, out, extra),
        )
    # more seeds: the same methods trained again (runs/METHOD-seedN), tuned and scored the same way
    seed_results: dict[str, list[dict[str, Any]]] = {m: [results[m]] for m in cfg.methods}
    for i in range(1, cfg.seeds):
        s = cfg.seed + i
        for m in cfg.methods:
            run_i = runs / f"{m}-seed{i}"
            trained_i = stages.run(
                f"training {m} (seed {s})", functools.partial(stage_train, cfg, m, data_root, run_i, seed=s)
            )
            path = run_i / "best.model"
            if m == "haf" and tuned is not None:
                stages.run(
                    f"tuning haf fusion weights on val (seed {s})",
                    functools.partial(stage_tune, cfg, run_i / "best.model", data_root, run_i / "tuned.model"),
                )
                path = run_i / "tuned.model"
            extra = {
                "label": results[m]["label"],
                "method": m,
                "trained": bool(trained_i.get("trained")),
                "note": f"seed {s}",
            }
            seed_results[m].append(
                stages.run(
                    f"evaluating {m} (seed {s}) on test",
                    functools.partial(stage_evaluate, cfg, f"{m}-seed{i}", path, test, data_root, out, extra),
                )
            )

    summary = {
        "dataset": {
            "name": "synthetic city",
            "root": "data",
            "test": test.summary(),
            "images_per_split": {
                s: len(v["database"]) + len(v["queries"]) for s, v in read_meta(data_root)["splits"].items()
            },
        },
        "methods": {k: {kk: vv for kk, vv in v.items() if kk not in ("key", "queries")} for k, v in results.items()},
        "order": [ev.name for ev in evals],
        "tuned_weights": None,
        "training": {
            m: {
                "trained": bool(t.get("trained")),
                **{
                    k: t.get("summary", {}).get(k)
                    for k in (
                        "best_epoch",
                        "best_val_recall@5",
                        "iterations",
                        "epochs_done",
                        "stopped_for_time",
                        "loss",
                        "seconds",
                    )
                },
            }
            for m, t in trained.items()
        },
    }
    if cfg.seeds > 1:
        summary["seeds"] = seed_summary(cfg, seed_results)
    if tuned is not None:
        w = [float(x) for x in tuned["weights"]]
        summary["tuned_weights"] = {
            **{f"w{i + 1}": x for i, x in enumerate(w)},
            "weights": w,
            "val_recall@1": tuned.get("recall@1"),
            "val_recall@5": tuned.get("recall@5"),
            "learned_weights": tuned.get("previous_weights"),
            "learned_val": tuned.get("previous"),
            "step": tuned.get("step"),
            "val_queries": tuned.get("num_queries"),
        }
    stages.run("report", lambda: (write_demo_report(out, cfg, summary, results, trained, stages.records), False))
    total_s = time.perf_counter() - t_start
    summary["timings"] = {"stages": stages.records, "total_s": round(total_s, 1)}
    write_json_atomic(out / "results.json", summary)
    write_json_atomic(
        out / "config.json",
        {
            "demo": cfg.to_dict(),
            "status": "finished",
            "train": {m: train_config(cfg, m, data_root, runs / m).to_dict() for m in cfg.methods},
            "timings": summary["timings"],
        },
    )
    print(
        f"hafloc demo: finished in {_fmt_seconds(total_s)}; open {out / 'index.html'}",
        file=stream or sys.stderr,
        flush=True,
    )
    return summary
