"""The demo's report: figures beside ``index.html`` (relative links), built from the stage outputs."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..datasets.synthetic import SIZE_CLASSES
from ..fileio import atomic_path
from ..heads import LABELS, METHODS
from ..reports import (
    ReportImage,
    Section,
    Table,
    coinciding_curves,
    plot_attention,
    plot_recall_curves,
    plot_retrievals,
    plot_seed_spread,
    plot_weights_table,
    write_report,
)
from .config import DemoConfig

BASELINES = tuple(m for m in METHODS if m != "haf")  # registry order

log = logging.getLogger(__name__)

CURVE_N = 25
_SIZE_TEXT = {"small": "small (5-10 % of the width)", "medium": "medium (20-30 %)", "large": "large (50 %+)"}


def _curve_from_hits(records: list[dict[str, Any]], n_max: int = CURVE_N) -> dict[str, list]:
    n = list(range(1, n_max + 1))
    hits = [r["first_hit"] for r in records]
    return {"n": n, "recall": [100.0 * sum(h is not None and h < k for h in hits) / max(len(hits), 1) for k in n]}


def pick_examples(records: list[dict[str, Any]], count: int, seed: int) -> list[int]:
    """Query indices to show: cycling through small/medium/large, random within a class (seeded),
    so the choice never depends on which method got them right."""
    rng = np.random.default_rng(seed)
    pools = {s: list(rng.permutation([i for i, r in enumerate(records) if r.get("size") == s])) for s in SIZE_CLASSES}
    order = [s for s in ("small", "medium", "large", "small", "medium", "large") * count]
    picked: list[int] = []
    for s in order:
        if len(picked) >= count:
            break
        if pools[s]:
            picked.append(int(pools[s].pop(0)))
    rest = [i for i in range(len(records)) if i not in picked]
    return picked + rest[: count - len(picked)]


def _baseline_for_examples(results: dict[str, Any], order: list[str]) -> str | None:
    for name in BASELINES:
        if name in results:
            return name
    return next((n for n in order if n != "haf" and not n.startswith("haf-")), None)


def _pct(v: Any) -> float | None:
    return None if v is None else round(float(v), 1)


def _kept_untrained(trained: dict[str, dict[str, Any]]) -> list[str]:
    """Methods that trained but whose best validation came at epoch 0: the model kept (and
    evaluated) is the untrained one, which no training step beat."""
    return [m for m, t in trained.items() if t.get("trained") and t.get("summary", {}).get("best_epoch") == 0]


def _overlap_note(curves: dict[str, dict[str, list]]) -> str:
    """A caption's sentence naming the curves that lie on top of each other ('' when none do)."""
    same = coinciding_curves({name: (c["n"], c["recall"]) for name, c in curves.items()})
    groups: dict[str, list[str]] = {}
    for name, first in same.items():
        groups.setdefault(first, [first]).append(name)
    quoted = [[f"“{n}”" for n in g] for g in groups.values()]  # labels hold commas ("HAF, tuned w")
    return "".join(
        f" The curves of {', '.join(q[:-1])} and {q[-1]} overlap exactly (same recall at every N)." for q in quoted
    )


def _findings(summary: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """Plain statements from the numbers (whoever wins): what the demo shows."""
    if "haf" not in results:
        return ["HAF was not among the methods run, so there is no comparison to draw."]
    base = [n for n in BASELINES if n in results]
    if not base:
        return []
    out = []
    for size in SIZE_CLASSES:
        h = results["haf"]["by_size"].get(size)
        if not h:
            continue
        best = max(
            base,
            key=lambda n: (
                results[n]["by_size"].get(size, {}).get("recall@1", -1),
                results[n]["by_size"].get(size, {}).get("recall@5", -1),
            ),
        )
        b = results[best]["by_size"].get(size, {})
        d1 = h["recall@1"] - b.get("recall@1", 0.0)
        verdict = "leads" if d1 > 0 else ("ties with" if d1 == 0 else "trails")
        out.append(
            f"{size.capitalize()} landmarks ({h['num_queries']} queries): HAF recall@1 {h['recall@1']:.1f} % "
            f"(recall@5 {h['recall@5']:.1f} %) - it {verdict} the best baseline, {results[best]['label']}, at "
            f"{b.get('recall@1', 0.0):.1f} % ({b.get('recall@5', 0.0):.1f} %)."
        )
    return out


def write_demo_report(
    out: Path,
    cfg: DemoConfig,
    summary: dict[str, Any],
    results: dict[str, dict[str, Any]],
    trained: dict[str, dict[str, Any]],
    stage_records: list[dict[str, Any]],
) -> Path:
    """Figures into ``out/figures`` and ``out/index.html``; returns the HTML path."""
    out = Path(out)
    fig = out / "figures"
    fig.mkdir(parents=True, exist_ok=True)
    data_root = out / "data"
    order = summary["order"]
    sections: list[Section] = []
    test = summary["dataset"]["test"]
    counts = {s: sum(r.get("size") == s for r in next(iter(results.values()))["queries"]) for s in SIZE_CLASSES}
    n_img = summary["dataset"]["images_per_split"]
    any_untrained = any(not t.get("trained") for t in trained.values())

    # -- what and why
    intro = [
        "Where was this photo taken? hafloc answers by retrieving the most similar photos from a database of "
        "geotagged images: a query counts as found at N when one of its top-N retrievals lies within 25 m.",
        f"This report comes from a synthetic city built on this machine (no download): streets of shared facade "
        f"styles, each place marked by one distinctive landmark. {n_img.get('train', 0)} training, "
        f"{n_img.get('val', 0)} validation and {n_img.get('test', 0)} test images. Database photos are daytime "
        f"views; queries are mostly dusk and night views from another viewpoint, with the landmark at another "
        f"apparent size: small ({counts['small']} test queries), medium ({counts['medium']}) or large "
        f"({counts['large']}).",
        "Why HAF exists: single-level descriptors (NetVLAD, CRN, GeM on the last conv layer) see large structures "
        "and miss landmarks that are small or far away. HAF taps three levels of one CNN, lets each level attend "
        "to what matters at its own scale, and fuses them with weights w1, w2, w3. The small-landmark column is "
        "where that should show.",
    ]
    if any_untrained:
        intro.append(
            "NOTE: training was not available in this build, so models marked '(untrained)' are only "
            "initialised (pretrained backbone + k-means clusters)."
        )
    kept = _kept_untrained(trained)
    if kept:
        names = ", ".join(LABELS.get(m, m) for m in kept)
        intro.append(
            f"NOTE: {names}: the best validation recall@5 came at epoch 0, before any training, so the untrained "
            f"model was selected - {'its' if len(kept) == 1 else 'their'} rows below show the initialised "
            "model (pretrained backbone + k-means clusters), not a trained one."
        )
    sections.append(Section("What you are looking at", paragraphs=intro + _findings(summary, results)))

    # -- results table
    rows = []
    for name in order:
        r = results[name]
        row: dict[str, Any] = {
            "method": r["label"],
            "R@1": _pct(r["recall@1"]),
            "R@5": _pct(r["recall@5"]),
            "R@10": _pct(r["recall@10"]),
        }
        for s in SIZE_CLASSES:
            bs = r["by_size"].get(s, {})
            row[f"{s} R@1"] = _pct(bs.get("recall@1"))
            row[f"{s} R@5"] = _pct(bs.get("recall@5"))
        row["dim"] = r["descriptor_dim"]
        rows.append(row)
    cols = ["method", "R@1", "R@5", "R@10"] + [f"{s} R@{n}" for s in SIZE_CLASSES for n in (1, 5)] + ["dim"]
    cond_rows = []
    conds = sorted({c for r in results.values() for c in r.get("by_condition", {})})
    for name in order:
        r = results[name]
        row = {"method": r["label"]}
        for c in conds:
            bc = r["by_condition"].get(c, {})
            row[f"{c} R@1"] = _pct(bc.get("recall@1"))
            row[f"{c} ({bc.get('num_queries', 0)} q) R@5"] = _pct(bc.get("recall@5"))
        cond_rows.append(row)
    cond_cols = ["method"] + [k for k in cond_rows[0] if k != "method"] if cond_rows else ["method"]
    curves = {results[n]["label"]: results[n]["recall_curve"] for n in order}
    plot_recall_curves(curves, fig / "recall_curves.png", title="Synthetic city, test")
    small = {
        results[n]["label"]: _curve_from_hits([q for q in results[n]["queries"] if q.get("size") == "small"])
        for n in order
    }
    images = [
        ReportImage(
            "figures/recall_curves.png",
            "Recall@N on the test split, all queries (the paper's Fig. 3 style)." + _overlap_note(curves),
        )
    ]
    if counts["small"]:
        plot_recall_curves(small, fig / "recall_curves_small.png", title="Small landmarks only")
        images.append(
            ReportImage(
                "figures/recall_curves_small.png",
                f"Recall@N on the {counts['small']} test queries whose landmark is small." + _overlap_note(small),
            )
        )
    sections.append(
        Section(
            "Results on the test split",
            paragraphs=[
                f"Recall@N in percent over {test['num_q']} queries against {test['num_db']} database images "
                "(25 m threshold), overall and by the landmark's size in the query. "
                "'learned w' is HAF as trained; 'tuned w' re-tunes its fusion weights on the validation split."
            ],
            tables=[
                Table(rows, cols, caption="Recall@N (%) by landmark size", floatfmt=".1f"),
                Table(cond_rows, cond_cols, caption="Recall@N (%) by query lighting", floatfmt=".1f"),
            ],
            images=images,
        )
    )

    # -- seeds: spread and the HAF-vs-baseline interval
    if summary.get("seeds"):
        sections.append(_seeds_section(summary["seeds"], fig))

    # -- fusion weights (Table 2 style)
    tw = summary.get("tuned_weights")
    if tw:
        wrows = []
        learned = tw.get("learned_weights") or []
        learned_val = tw.get("learned_val") or {}
        for label, w, val5, test_name in (
            ("learned in training", learned, learned_val.get("recall@5"), "haf-learned"),
            (f"tuned on val (step {tw['step']:g})", tw["weights"], tw.get("val_recall@5"), "haf"),
        ):
            if len(w) != 3:
                continue
            wrows.append(
                {
                    "dataset": label,
                    "w1": float(w[0]),
                    "w2": float(w[1]),
                    "w3": float(w[2]),
                    "recall@5": round(float(val5), 1) if val5 is not None else None,
                    "test R@5": _pct(results.get(test_name, {}).get("recall@5")),
                }
            )
        if "haf-untrained" in results and results["haf-untrained"].get("fusion_weights"):
            w = results["haf-untrained"]["fusion_weights"]
            wrows.append(
                {
                    "dataset": "untrained (uniform)",
                    "w1": w[0],
                    "w2": w[1],
                    "w3": w[2],
                    "recall@5": None,
                    "test R@5": _pct(results["haf-untrained"]["recall@5"]),
                }
            )
        if wrows:
            plot_weights_table(
                [{k: ("-" if v is None else v) for k, v in r.items() if k != "test R@5"} for r in wrows],
                fig / "weights.png",
                title="HAF fusion weights (val recall@5)",
            )
            sections.append(
                Section(
                    "HAF fusion weights",
                    paragraphs=[
                        "w1, w2, w3 weight the low, mid and high level (they sum to 1); the cosine of two fused "
                        "descriptors is sum_l w_l cos_l. Training learns them; tuning then picks the point of a "
                        f"{tw['step']:g}-step grid on the simplex with the best recall@5 on the "
                        f"{tw.get('val_queries')} validation queries (the paper's Table 2)."
                    ],
                    tables=[
                        Table(
                            wrows,
                            ["dataset", "w1", "w2", "w3", "recall@5", "test R@5"],
                            headers={
                                "dataset": "weights",
                                "w1": "w1 (low)",
                                "w2": "w2 (mid)",
                                "w3": "w3 (high)",
                                "recall@5": "val R@5 (%)",
                                "test R@5": "test R@5 (%)",
                            },
                        )
                    ],
                    images=[ReportImage("figures/weights.png", "The same table as a figure.")],
                )
            )

    # -- examples
    if "haf" in results:
        hq = results["haf"]["queries"]
        other = _baseline_for_examples(results, order)
        ex_images = []
        for k, qi in enumerate(pick_examples(hq, cfg.num_examples, cfg.seed)):
            rec = hq[qi]
            for name in ["haf"] + ([other] if other else []):
                r = results[name]["queries"][qi]
                top = r["top"][: cfg.top_k]
                if not top:
                    continue
                titles = [f"query: {rec.get('size')}, {rec.get('condition')}"]
                titles += [
                    f"#{j + 1} {'✓' if ok else '✗'} {d:.0f} m" if j < len(r["dist_m"]) else f"#{j + 1}"
                    for j, (ok, d) in enumerate(zip(r["correct"][: cfg.top_k], r["dist_m"] + [0] * cfg.top_k))
                ]
                path = fig / f"example{k + 1}-{name}.png"
                plot_retrievals(
                    data_root / rec["query"],
                    [data_root / t for t in top],
                    r["correct"][: cfg.top_k],
                    path,
                    titles=titles,
                )
                first = r["first_hit"]
                where = "not in the top 25" if first is None else f"first right match at rank {first + 1}"
                ex_images.append(
                    ReportImage(
                        f"figures/{path.name}",
                        f"Example {k + 1}, {results[name]['label']}: {where}. "
                        "Green = within 25 m (right), red = wrong; distances to the query.",
                    )
                )
        sections.append(
            Section(
                "Example queries",
                paragraphs=[
                    f"{cfg.num_examples} test queries chosen at random per landmark size (not by outcome), each "
                    f"with its top-{cfg.top_k} retrievals by HAF"
                    + (f" and by {results[other]['label']}." if other else ".")
                ],
                images=ex_images,
            )
        )

        # -- attention
        att_images = _attention_figures(out, cfg, hq, fig)
        if att_images:
            sections.append(
                Section(
                    "Where HAF looks",
                    paragraphs=[
                        "Per-level attention maps of the trained HAF model overlaid on test queries: the low level "
                        "(stride 8) resolves small structures, the high level (stride 32) large ones. Each map is "
                        "normalised on its own."
                    ],
                    images=att_images,
                )
            )

    # -- training curves
    hist = []
    for m, t in trained.items():
        p = out / "runs" / m / "history.png"
        if t.get("trained") and p.is_file():
            # a copy: the report stays whole while a later run with other settings redoes runs/
            with atomic_path(fig / f"history-{m}.png") as tmp:
                shutil.copyfile(p, tmp)
            s = t.get("summary", {})
            best = (
                "epoch 0, before any training: the untrained model was selected"
                if m in kept
                else f"epoch {s.get('best_epoch')}"
            )
            hist.append(
                ReportImage(
                    f"figures/history-{m}.png",
                    f"{LABELS.get(m, m)}: loss {s.get('loss')}, {s.get('iterations')} iterations in "
                    f"{s.get('seconds')} s; best val R@5 {s.get('best_val_recall@5')} at {best}.",
                )
            )
    sections.append(
        Section(
            "Training",
            paragraphs=[
                f"Each method trained for {cfg.epochs} epochs"
                + (f" (at most {cfg.train_minutes:g} min)" if cfg.train_minutes else "")
                + " on the training split with GPS supervision (positives within 10 m, hard negatives beyond "
                "25 m), validated on val after every epoch; the model with the best val recall@5 is kept (that "
                "may be epoch 0, before any training, when a brief run does not help)."
            ]
            if hist
            else ["No training curves: training did not run in this build."],
            images=hist,
        )
    )

    # -- configuration and timings
    timing_lines = [f"{r['stage']:<40} {r['seconds']:>8.1f} s  {r['status']}" for r in stage_records]
    pre = "stage timings (this run; 'reused' = finished by an earlier run)\n" + "\n".join(timing_lines)
    pre += f"\n{'total before the report':<40} {sum(r['seconds'] for r in stage_records):>8.1f} s"
    pre += "\n\nconfiguration\n" + "\n".join(f"{k:<16} {json.dumps(v)}" for k, v in cfg.to_dict().items())
    sections.append(
        Section(
            "Configuration and timings",
            paragraphs=[
                "Also in config.json and results.json beside this page. Rerunning the same "
                "command reuses every finished stage."
            ],
            pre=pre,
        )
    )
    return write_report(
        out,
        "hafloc demo: geo-localization in a synthetic city",
        sections,
        footer="hafloc demo - HAF (Yan et al., ICASSP 2021) with NetVLAD / CRN / GeM baselines",
    )


def _ms(m: dict[str, Any] | None) -> str:
    if not m or not m.get("n"):
        return "-"
    return f"{m['mean']:.1f}" if m.get("std") is None else f"{m['mean']:.1f} ± {m['std']:.1f}"


def _seeds_section(seeds: dict[str, Any], fig: Path) -> Section:
    """Mean +- std over the training seeds, the spread figure, and HAF minus the best baseline."""
    ms = seeds["methods"]
    rows = [
        {
            "method": e["label"],
            "R@1": _ms(e["recall@1"]),
            "R@5": _ms(e["recall@5"]),
            **{f"{z} R@1": _ms(e["by_size"].get(z)) for z in SIZE_CLASSES},
        }
        for e in ms.values()
    ]
    cols = ["method", "R@1", "R@5"] + [f"{z} R@1" for z in SIZE_CLASSES]
    plot_seed_spread(
        {"synthetic city, test": {e["label"]: [r["recall@1"] for r in e["per_seed"]] for e in ms.values()}},
        fig / "seeds.png",
    )
    paras = [
        f"Every method trained {len(seeds['seeds'])} times (seeds {', '.join(map(str, seeds['seeds']))}) with "
        "the same budget; cells are mean ± sample std over the seeds, in percent. The first seed's models are the "
        "ones in the other sections."
    ]
    iv = seeds.get("haf_vs_best_baseline")
    if iv:
        r1, r5 = iv["recall@1"], iv["recall@5"]

        def pp(r: dict[str, Any]) -> str:
            return f"{100 * r['mean_diff']:+.1f} points [95 % interval {100 * r['low']:+.1f}, {100 * r['high']:+.1f}]"

        verdict = (
            "so the difference is not resolved by this many queries and seeds"
            if r1["low"] <= 0 <= r1["high"]
            else (
                "HAF is ahead beyond query-sampling noise"
                if r1["low"] > 0
                else f"{ms[iv['baseline']]['label']} is ahead beyond query-sampling noise"
            )
        )
        paras.append(
            f"HAF minus the best baseline ({ms[iv['baseline']]['label']}, by mean recall@1): recall@1 "
            f"{pp(r1)}, recall@5 {pp(r5)}; paired bootstrap over the {r1['n_queries']} test queries, each "
            f"method's seeds pooled per query, {r1['n_boot']:,} resamples - {verdict}."
        )
    return Section(
        "Seeds: spread and HAF against the best baseline",
        paragraphs=paras,
        tables=[Table(rows, cols, caption="Recall@N (%), mean ± std over seeds")],
        images=[ReportImage("figures/seeds.png", "Test recall@1 of each seed (dots) and mean ± std.")],
    )


def _attention_figures(out: Path, cfg: DemoConfig, records: list[dict[str, Any]], fig: Path) -> list[ReportImage]:
    """Attention overlays on one small-landmark and one large-landmark query (HAF, eager torch)."""
    from ..descriptors.extract import Extractor
    from ..descriptors.modelfile import load_model
    from ..images.io import load_image

    model_path = out / "runs" / "haf" / "tuned.model"
    if not model_path.is_file():
        model_path = out / "runs" / "haf" / "best.model"
    try:
        model = load_model(model_path)
    except Exception as err:  # the report must not fail for a figure
        log.warning("no attention figure: %s", err)
        return []
    ex = Extractor(model, batch_size=1, backend="torch", image_size=cfg.image_size)
    picks = pick_examples(records, len(records), cfg.seed)
    images = []
    for size in ("small", "large"):
        qi = next((i for i in picks if records[i].get("size") == size), None)
        if qi is None:
            continue
        rec = records[qi]
        img = load_image(out / "data" / rec["query"])
        att = ex.describe_image(img)["attention"]
        if not att:
            continue
        path = fig / f"attention-{size}.png"
        plot_attention(img, att, path, strides=dict(model.backbone.strides))
        flat = [lv for lv, a in att.items() if float(np.ptp(a)) <= 1e-6 * max(float(np.abs(a).max()), 1e-12)]
        note = (
            f" The {', '.join(flat)} map(s) are uniform (shown blank): that attention has not been trained yet."
            if flat
            else ""
        )
        images.append(
            ReportImage(f"figures/{path.name}", f"A {_SIZE_TEXT[size]} landmark, {rec.get('condition')} query.{note}")
        )
    return images
