"""The training loop: NetVLAD-style weakly supervised training of any method, resumable.

Schedule. An epoch visits the valid training queries in an order fixed by (seed, epoch),
in *rounds* of ``cache_refresh`` queries. A round starts by (re)computing the cached global
descriptors of the training database (and of the round's queries) with the current model;
each batch of ``batch_size`` queries is then mined (positive = nearest potential positive,
negatives = hardest of a random pool + last round's hardest) and trained on.

Checkpoints are written only at round starts (and after each epoch's validation): there the
cache is a pure function of the saved weights, so ``--resume`` recomputes it and continues
exactly as the uninterrupted run would (same weights, same history). ``checkpoint_every``
iterations are therefore rounded up to the next round start.

Frozen-trunk cache (``trunk_cache.py``, on by default): the frozen backbone groups run once per
image before training starts; steps, refreshes and validation then start from their stored
output and run only the trainable groups and the head.

Distributed (torchrun): every rank mines the same global batch (same cache, same miner state)
and trains on its shard of the tuples under DistributedDataParallel; descriptor extraction is
split across ranks and gathered; rank 0 writes every file.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..datasets.base import source_subsets
from ..descriptors.fit import fit_clusters, fit_whitening
from ..descriptors.modelfile import save_model
from ..descriptors.network import GeoLocNet, ModelConfig
from ..descriptors.runtime import Batch, TorchRunner, run_batches
from ..errors import HaflocError, InputError
from ..fileio import atomic_path, write_text_atomic
from ..metrics.protocols import score
from . import distributed as D
from .config import TrainConfig
from .data import TrainData, load_train_data
from .losses import LOSSES, compute_loss, default_loss_for
from .mining import HardNegativeMiner
from .trunk_cache import CachedTrunkNet, TrunkCache, frozen_groups, why_not_cacheable

log = logging.getLogger(__name__)

CKPT_FORMAT = "hafloc-train-ckpt"
HISTORY_FIELDS = ("epoch", "loss", "val_recall@1", "val_recall@5", "val_recall@10", "time")


# ----------------------------------------------------------------------------- model setup


def build_model(cfg: TrainConfig, fit_paths: list[Path] | None, progress: bool = True) -> tuple[GeoLocNet, dict]:
    """The method on its pretrained backbone, clusters/projections fitted on ``fit_paths``."""
    mcfg = ModelConfig.for_method(cfg.method, cfg.backbone, **cfg.head_overrides())
    mcfg.max_side = max(cfg.image_size)
    model = GeoLocNet(mcfg, pretrained=True, backbone_weights=cfg.backbone_weights)
    info: dict = {}
    if fit_paths:
        info = fit_clusters(model, fit_paths, seed=cfg.seed, max_side=max(cfg.image_size), progress=progress)
    return model, info


def freeze_backbone(model: GeoLocNet, train_stages: int) -> list[nn.Module]:
    """Freeze the backbone but its last ``train_stages`` groups; returns the frozen groups."""
    groups = model.backbone.trainable_groups()
    n = min(max(train_stages, 0), len(groups))
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    for g in groups[len(groups) - n :]:
        for p in g.parameters():
            p.requires_grad_(True)
    return list(groups[: len(groups) - n])


def set_train_mode(model: GeoLocNet, frozen: list[nn.Module]) -> None:
    """Train mode, except frozen stages: their BatchNorm keeps its ImageNet statistics."""
    model.train()
    for g in frozen:
        g.eval()


def build_optimizer(model: GeoLocNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    head = [p for p in model.head.parameters() if p.requires_grad]  # fusion_logits included for haf
    groups = [
        g for g in ({"params": backbone, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr or cfg.lr}) if g["params"]
    ]
    if not groups:
        raise HaflocError("nothing to train: every parameter is frozen")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def tuple_loss(
    net: nn.Module,
    images: torch.Tensor | dict[str, torch.Tensor],
    num_tuples: int,
    num_negatives: int,
    loss: str,
    margin: float | None,
    neg_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Loss of ``num_tuples`` tuples laid out as [queries; positives; negatives (tuple-major)].

    One forward pass for all images of the batch; ``net`` is the model or its DDP wrapper, or a
    ``CachedTrunkNet`` (then ``images`` is its trunk state, laid out the same way).
    """
    out = net(images)
    b, n = num_tuples, num_negatives
    q, p, negs = {}, {}, {}
    for key in LOSSES[loss].needs:
        t = out[key]
        q[key], p[key] = t[:b], t[b : 2 * b]
        negs[key] = t[2 * b :].reshape(b, n, *t.shape[1:])
    return compute_loss(loss, q, p, negs, margin=margin, neg_mask=neg_mask)


# ----------------------------------------------------------------------------- state helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tensors / plain types (loadable with weights_only)."""
    # legacy=True (the default) gives the tuple form; numpy's stubs return it as a union with a dict
    np_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    py = random.getstate()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])


@dataclass
class Progress:
    """Where the run stands; all plain types (it goes into last.ckpt)."""

    epoch: int = 0  # current epoch (0-based)
    position: int = 0  # queries of this epoch already trained on
    iteration: int = 0  # optimizer steps so far
    best_recall5: float = -1.0  # the best validation score (TrainConfig.select; recall@5 by default)
    best_epoch: float = -1  # fractional: validation can run mid-epoch
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    elapsed: float = 0.0  # training seconds before this process (resumed runs)
    dropped_queries: int = 0
    done: bool = False


def save_checkpoint(
    path: Path,
    model: GeoLocNet,
    optimizer: torch.optim.Optimizer,
    miner: HardNegativeMiner,
    prog: Progress,
    cfg: TrainConfig,
) -> None:
    payload = {
        "format": CKPT_FORMAT,
        "config": cfg.to_dict(),
        "model_config": model.config.to_dict(),
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "miner": miner.state_dict(),
        "rng": rng_state(),
        "progress": dict(prog.__dict__),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(path, "no checkpoint to resume from") from None
    except Exception as err:
        raise InputError(
            path, f"unreadable checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CKPT_FORMAT:
        raise InputError(path, "not a hafloc training checkpoint")
    return payload


def selection_score(r: dict, select: str) -> float:
    """The validation score that picks best.model: recall@5, recall@1 or recall@1+5 (their mean)."""
    if select == "recall@1+5":
        return (r.get("recall@1", -1.0) + r.get("recall@5", -1.0)) / 2
    return float(r.get(select, -1.0))


def write_history(out: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    extra = [k for k in dict.fromkeys(k for row in history for k in row) if k not in HISTORY_FIELDS]
    fields = [*HISTORY_FIELDS, *extra]  # several datasets: a column per set
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow(
            {
                k: ("" if row.get(k) is None or (isinstance(row.get(k), float) and math.isnan(row[k])) else row[k])
                for k in fields
            }
        )
    write_text_atomic(out / "history.csv", buf.getvalue())
    try:
        from ..reports import plot_history

        plot_history(out / "history.csv", out / "history.png")
    except Exception as err:  # a plot must never cost a training run
        log.warning("could not plot the history: %s", err)


# ----------------------------------------------------------------------------- the trainer


class Trainer:
    """One training run (a fresh one, or a resumed one when ``resume`` is set)."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.dist = D.setup()
        self.main = self.dist.is_main
        self.progress_bars = cfg.progress and self.main
        self.t_start = time.monotonic()
        self.loss_name = cfg.loss or default_loss_for(cfg.method)
        if self.loss_name not in LOSSES:
            raise HaflocError(f"unknown loss {self.loss_name!r}; choose from {', '.join(LOSSES)}")
        seed_everything(cfg.seed)
        ckpt = None
        if resume:
            ckpt = load_checkpoint(self.out / "last.ckpt")
        self.data: TrainData = load_train_data(cfg, progress=self.progress_bars)
        d = self.data
        if ckpt is None:
            rng = np.random.default_rng(cfg.seed)
            db_paths = d.train.db_paths()
            pick = np.sort(rng.choice(len(db_paths), min(cfg.fit_images, len(db_paths)), replace=False))
            fit_paths = [db_paths[i] for i in pick]
        else:
            fit_paths = None
        self.model, self.fit_info = build_model(cfg, fit_paths, progress=self.progress_bars)
        self.device = torch.device(self.dist.device)
        self.model.to(self.device)
        if self.loss_name == "dd" and "scores" not in self._probe_keys():
            raise HaflocError(f"loss 'dd' needs a VLAD head; method {cfg.method!r} has none (use --loss triplet)")
        self.frozen = freeze_backbone(self.model, cfg.train_stages)
        self.optimizer = build_optimizer(self.model, cfg)
        self.miner = HardNegativeMiner(
            d.positives,
            d.non_negatives,
            num_db=len(d.db_ids),
            num_negatives=cfg.num_negatives,
            pool_size=cfg.neg_pool,
            seed=cfg.seed,
        )
        self.prog = Progress(dropped_queries=self.miner.num_dropped)
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.miner.load_state_dict(ckpt["miner"])
            set_rng_state(ckpt["rng"])
            self.prog = Progress(**ckpt["progress"])
        if self.miner.num_dropped:
            log.info(
                "%d of %d training queries have no positive and are dropped", self.miner.num_dropped, len(d.positives)
            )
        if len(self.miner.valid_queries) == 0:
            raise HaflocError(f"{d.train.name}: no training query has a positive; nothing to train on")
        self.trunk, self.trunk_info = self._open_trunk_cache()
        # with the trunk cache, steps and descriptors start from the cached frozen groups' output
        self._body: nn.Module = CachedTrunkNet(self.model, self.trunk.stop) if self.trunk else self.model
        self.net: nn.Module = self._body
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self._body, device_ids=ids, find_unused_parameters=True)
        self._runner = TorchRunner(self.model, outputs=("descriptor",))
        self._memo: dict[int, np.ndarray] = {}  # store index -> descriptor under the current weights
        self._sec_per_image = 0.05
        self._last_ckpt_iter = self.prog.iteration
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.json")

    def _open_trunk_cache(self) -> tuple[TrunkCache | None, dict]:
        """The frozen-trunk cache, built over every image training and validation use (or None)."""
        cfg, d = self.cfg, self.data
        why = "--trunk-cache no" if cfg.trunk_cache == "no" else why_not_cacheable(self.model, cfg.train_stages)
        if why is not None:
            log.info("trunk cache off: %s", why)
            return None, {"enabled": False, "reason": why}
        root = Path(cfg.cache) if cfg.cache else self.out / ".trunk_cache"
        cache = TrunkCache(
            root, self.model, frozen_groups(self.model, cfg.train_stages), cfg.image_size, dtype=cfg.trunk_cache
        )
        used = np.unique(np.concatenate([d.db_ids, d.q_ids, d.val_db_ids, d.val_q_ids]))
        info = cache.build(
            d.store.paths,
            d.store.load,
            ids=used.tolist(),
            batch_size=cfg.eval_batch_size,
            workers=cfg.workers,
            progress=self.progress_bars,
        )
        d.store.drop_cache()  # the decoded images are no longer read
        return cache, {"enabled": True, **info}

    def _probe_keys(self) -> set[str]:
        h, w = self.cfg.image_size
        self.model.eval()
        with torch.no_grad():
            return set(self.model(torch.zeros(1, 3, h, w, device=self.device)))

    # -- descriptors ------------------------------------------------------------------------
    def describe(self, ids: np.ndarray) -> np.ndarray:
        """Global descriptors (eval mode) of store images; memoised until the next optimizer step."""
        ids = np.asarray(ids, dtype=np.int64)
        todo = np.unique([i for i in ids.tolist() if i not in self._memo]).astype(np.int64)
        if len(todo):
            mine = todo[self.dist.rank :: self.dist.world_size]
            self.model.eval()
            chunks = []
            t0 = time.monotonic()
            bar = tqdm(
                total=len(todo),
                desc="train: descriptors",
                unit="img",
                leave=False,
                disable=not self.progress_bars or len(todo) < 64,
                dynamic_ncols=True,
            )
            if self.trunk is not None:
                bs = self.cfg.eval_batch_size
                for s in range(0, len(mine), bs):
                    state = {k: v.to(self.device) for k, v in self.trunk.batch(mine[s : s + bs]).items()}
                    with torch.inference_mode():
                        chunks.append(self._body(state)["descriptor"].float().cpu().numpy())
                    bar.update(len(mine[s : s + bs]) * self.dist.world_size)
            else:
                # one image size: batches run in order, in chunks of eval_batch_size
                for ev in run_batches(
                    self._runner,
                    mine.tolist(),
                    self.data.store.load,
                    self.cfg.eval_batch_size,
                    workers=self.cfg.workers,
                ):
                    if not isinstance(ev, Batch):  # the store checked every image up front
                        raise ev.error
                    chunks.append(ev.outputs["descriptor"])
                    bar.update(len(ev.items) * self.dist.world_size)
            bar.close()
            dim = self.model.out_dim
            local = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
            allv = D.gather_rows(self.dist, local, len(todo))
            self._sec_per_image = (time.monotonic() - t0) / max(len(todo), 1)
            for i, v in zip(todo.tolist(), allv):
                self._memo[i] = v
        return (
            np.stack([self._memo[i] for i in ids.tolist()])
            if len(ids)
            else np.zeros((0, self.model.out_dim), np.float32)
        )

    def validate(self) -> dict:
        """Val recall@1/5/10; for several datasets, each one's (``NAME/recall@5``) and their mean."""
        d = self.data
        db = self.describe(d.val_db_ids)
        q = self.describe(d.val_q_ids)
        keys = ("recall@1", "recall@5", "recall@10")
        parts = source_subsets(d.val)
        if len(parts) == 1:
            res = score(d.val, db, q)
            return {k: float(res[k]) for k in keys if k in res}
        out: dict = {}
        for name, db_idx, q_idx in parts:
            res = score(d.val.subset(db_idx, q_idx), db[db_idx], q[q_idx])
            out.update({f"{name}/{k}": float(res[k]) for k in keys if k in res})
        for k in keys:
            out[k] = float(np.mean([out[f"{name}/{k}"] for name, _, _ in parts]))
        return out

    # -- schedule ---------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.cfg.seed, epoch])
        order = rng.permutation(self.miner.valid_queries)
        if self.cfg.max_queries_per_epoch:
            order = order[: self.cfg.max_queries_per_epoch]
        return order

    def elapsed(self) -> float:
        return self.prog.elapsed + time.monotonic() - self.t_start

    def out_of_time(self) -> bool:
        if self.cfg.time_budget is None:
            return False
        # keep time for the final validation (and whitening) so the budget holds end to end
        d = self.data
        n_final = (
            len(d.val_db_ids)
            + len(d.val_q_ids)
            + (min(len(d.db_ids), self.cfg.whitening_images) if self.cfg.dim else 0)
        )
        reserve = 1.2 * n_final * self._sec_per_image + 5.0
        return D.any_true(self.dist, self.elapsed() + reserve > self.cfg.time_budget * 60.0)

    def checkpoint(self) -> None:
        if self.main:
            snap = Progress(**{**self.prog.__dict__, "elapsed": self.elapsed()})
            save_checkpoint(self.out / "last.ckpt", self.model, self.optimizer, self.miner, snap, self.cfg)
        self._last_ckpt_iter = self.prog.iteration
        D.barrier(self.dist)

    def _mine_batch(self, qs: np.ndarray, db_desc: np.ndarray, q_desc: dict[int, np.ndarray]):
        tuples = []
        for qi in qs.tolist():
            pos, negs = self.miner.mine(qi, q_desc[qi], db_desc)
            if len(negs):
                tuples.append((qi, pos, negs))
        return tuples

    def _step(self, tuples: list) -> float:
        d, cfg, n = self.data, self.cfg, self.cfg.num_negatives
        local = tuples[self.dist.rank :: self.dist.world_size]
        weight = 1.0
        if not local:  # keep DDP ranks in step: a zero-weight copy of some tuple
            local, weight = tuples[:1], 0.0
        q_ids = [int(d.q_ids[qi]) for qi, _, _ in local]
        p_ids = [int(d.db_ids[p]) for _, p, _ in local]
        neg_ids: list[int] = []
        mask = torch.zeros(len(local), n, dtype=torch.bool)
        for j, (_, _, negs) in enumerate(local):
            k = len(negs)
            mask[j, :k] = True
            padded = list(negs) + [negs[0]] * (n - k)  # padding is masked out of the loss
            neg_ids.extend(int(d.db_ids[x]) for x in padded)
        ids = q_ids + p_ids + neg_ids
        x: torch.Tensor | dict[str, torch.Tensor]
        if self.trunk is not None:
            x = {k: v.to(self.device, non_blocking=True) for k, v in self.trunk.batch(ids).items()}
        else:
            x = d.store.batch(ids).to(self.device, non_blocking=True)
        mask = mask.to(self.device)
        set_train_mode(self.model, self.frozen)
        self.optimizer.zero_grad(set_to_none=True)
        loss = tuple_loss(self.net, x, len(local), n, self.loss_name, cfg.margin, mask) * weight
        loss.backward()
        self.optimizer.step()
        self._memo.clear()
        self.prog.iteration += 1
        return D.mean_scalar(self.dist, float(loss.detach()))

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, prog, d = self.cfg, self.prog, self.data
        stopped_for_time = False
        if not prog.history and not prog.done:
            r = self.validate()  # the untrained model is the baseline the best model must beat
            self._record(0, math.nan, r)
            self._maybe_best(0, r)
            self.checkpoint()
        while not prog.done and prog.epoch < cfg.epochs:
            order = self.epoch_order(prog.epoch)
            bar = tqdm(
                total=len(order),
                initial=prog.position,
                desc=f"epoch {prog.epoch + 1}/{cfg.epochs}",
                unit="q",
                disable=not self.progress_bars,
                dynamic_ncols=True,
            )
            while prog.position < len(order) and not stopped_for_time:
                if prog.iteration - self._last_ckpt_iter >= cfg.checkpoint_every:
                    self.checkpoint()
                round_q = order[prog.position : prog.position + cfg.cache_refresh]
                db_desc = self.describe(d.db_ids)
                q_desc = dict(
                    zip(round_q.tolist(), db_desc[round_q] if d.self_queries else self.describe(d.q_ids[round_q]))
                )
                for s in range(0, len(round_q), cfg.batch_size):
                    if self.out_of_time():
                        stopped_for_time = True
                        break
                    qs = round_q[s : s + cfg.batch_size]
                    tuples = self._mine_batch(qs, db_desc, q_desc)
                    if tuples:
                        loss = self._step(tuples)
                        prog.epoch_losses.append(loss)
                        bar.set_postfix(loss=f"{loss:.4f}")
                    prog.position += len(qs)
                    bar.update(len(qs))
            bar.close()
            if stopped_for_time:
                break
            loss = float(np.mean(prog.epoch_losses)) if prog.epoch_losses else math.nan
            r = self.validate()
            prog.epoch += 1
            prog.position, prog.epoch_losses = 0, []
            self._record(prog.epoch, loss, r)
            improved = self._maybe_best(prog.epoch, r)
            prog.bad_epochs = 0 if improved else prog.bad_epochs + 1
            if cfg.patience and prog.bad_epochs >= cfg.patience:
                log.info("early stop: no val %s gain in %d epoch(s)", cfg.select, prog.bad_epochs)
                prog.done = True
            if prog.epoch >= cfg.epochs:
                prog.done = True
            self.checkpoint()
        if stopped_for_time:
            log.info("time budget of %.1f min reached: stopping", cfg.time_budget)
            if prog.epoch_losses:  # a partial epoch: validate it, but leave last.ckpt at its last round start
                r = self.validate()
                ep = round(prog.epoch + prog.position / max(len(self.epoch_order(prog.epoch)), 1), 3)
                self._record(ep, float(np.mean(prog.epoch_losses)), r)
                self._maybe_best(ep, r)
        return self.finish(stopped_for_time)

    def _record(self, epoch: float, loss: float, r: dict) -> None:
        row = {
            "epoch": epoch,
            "loss": None if math.isnan(loss) else round(loss, 6),
            **{f"val_{k}": round(v, 4) for k, v in r.items()},
            "time": round(self.elapsed(), 1),
        }
        self.prog.history.append(row)
        if self.main:
            write_history(self.out, self.prog.history)
            log.info(
                "epoch %s: loss %s, val R@1 %.2f R@5 %.2f R@10 %.2f",
                epoch,
                row["loss"],
                r.get("recall@1", math.nan),
                r.get("recall@5", math.nan),
                r.get("recall@10", math.nan),
            )

    def _maybe_best(self, epoch: float, r: dict) -> bool:
        """Best = highest validation score (``--select``; the mean over the sets for several datasets);
        with several datasets, none may be below its start (a model that gains on one set and
        loses on another is not selected)."""
        score = selection_score(r, self.cfg.select)
        if score <= self.prog.best_recall5:
            return False
        start = self.prog.history[0] if self.prog.history else {}
        sets = sorted({k.rsplit("/", 1)[0] for k in r if "/" in k})
        worse = [
            n
            for n in sets
            if selection_score({k.split("/", 1)[1]: v for k, v in r.items() if k.startswith(n + "/")}, self.cfg.select)
            < selection_score(
                {k[len(f"val_{n}/") :]: v for k, v in start.items() if k.startswith(f"val_{n}/")}, self.cfg.select
            )
            - 1e-3
        ]
        if worse and epoch != 0:
            log.info("epoch %s not selected: %s below the start", epoch, ", ".join(worse))
            return False
        self.prog.best_recall5, self.prog.best_epoch = score, epoch
        if self.main:
            save_model(self.model, self.out / "best.model", meta=self._meta(epoch, r))
        return True

    def _meta(self, epoch: float, r: dict) -> dict:
        return {
            "fit": self.fit_info,
            "trained": {
                "method": self.cfg.method,
                "dataset": str(self.cfg.dataset),
                "epoch": epoch,
                "val": r,
                "loss": self.loss_name,
                "supervision": self.data.supervision,
                "image_size": list(self.cfg.image_size),
                "fusion_weights": [round(float(w), 4) for w in self.model.head.fusion_weights().detach()],
            },
        }

    def finish(self, stopped_for_time: bool) -> dict:
        """Whitening (if asked) into best.model; the summary."""
        cfg, d = self.cfg, self.data
        summary = {
            "output": str(self.out),
            "best_epoch": self.prog.best_epoch,
            "best_val_recall@5": next(
                (h.get("val_recall@5") for h in self.prog.history if h["epoch"] == self.prog.best_epoch),
                self.prog.best_recall5,
            ),
            "select": cfg.select,
            "best_val_score": self.prog.best_recall5,
            "iterations": self.prog.iteration,
            "epochs_done": self.prog.epoch,
            "stopped_for_time": stopped_for_time,
            "supervision": d.supervision,
            "loss": self.loss_name,
            "dropped_queries": self.prog.dropped_queries,
            "skipped_images": d.skipped,
            "trunk_cache": self.trunk_info,
            "history": self.prog.history,
            "seconds": round(self.elapsed(), 1),
            "rank": self.dist.rank,
        }
        if self.main and cfg.dim and (self.out / "best.model").exists():
            from ..descriptors.modelfile import load_model, read_model_file

            best = load_model(self.out / "best.model")
            meta = read_model_file(self.out / "best.model").get("meta", {})
            paths = d.train.db_paths()
            meta["whitening"] = fit_whitening(
                best, paths, cfg.dim, max_images=cfg.whitening_images, seed=cfg.seed, progress=self.progress_bars
            )
            save_model(best, self.out / "best.model", meta=meta)
        D.barrier(self.dist)
        d.store.close()
        if self.trunk is not None:
            self.trunk.close()
        D.teardown(self.dist)
        return summary


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run (or resume) a training run; returns a summary dict (rank 0's files are the outputs)."""
    return Trainer(cfg, resume=resume).run()
