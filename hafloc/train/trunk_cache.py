"""Frozen-trunk cache: the frozen backbone groups' outputs, computed once per training image.

With the default ``train_stages=1`` most of the backbone never changes during training, yet every
tuple and every mining refresh runs it again. The cache stores, per image at the training size,
what the frozen groups produce (``Backbone.forward_until``): the taps the head reads that come
from frozen blocks, and the input of the first trainable block ("carry"; stored once when it is
one of those taps). Training and mining then run only ``Backbone.forward_from`` + the head
(:class:`CachedTrunkNet`).

Exactness. Frozen groups run in eval mode (BatchNorm with ImageNet statistics) and no gradient
reaches them, so their output is a pure function of (frozen weights, image, size): caching it
changes nothing but the rounding of the stored dtype (float16 by default; float32 is exact).
The training loop has no random augmentation; one that changed the trunk's input per step would
make the cache wrong, so such a loop must turn it off (``trunk_cache="no"``).

On disk (bounded memory: every shard is a read-only memmap):
``ROOT/<backbone>-<key>/`` where ``key`` digests the frozen groups' weights and buffers, the
number of frozen groups, the stored fields, the image size and the dtype (any change: a new
folder). Inside, ``shard-NNNNNN.npy`` (rows x the flattened fields) and ``shard-NNNNNN.json``
(the image keys of its rows: resolved path | size | mtime_ns). The JSON is written after its
``.npy`` and is the commit marker: a build killed part-way keeps every committed shard and
the rerun computes only the rest. A lock file serialises builders (two processes building the
same cache: the second waits, then finds the images done). A model on fewer levels without a
folder of its own reads the folder of every level when there is one (its rows hold the same
taps; the others are dropped from each batch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..backbones.base import LEVELS, Backbone
from ..descriptors.network import GeoLocNet
from ..descriptors.runtime import Batch, run_batches
from ..errors import HaflocError, InputError
from ..fileio import atomic_path, os_lock, write_json_atomic

log = logging.getLogger(__name__)

VERSION = 1
SHARD_ROWS = 256  # images per shard: the most a crash can cost
DTYPES = {"float16": np.float16, "float32": np.float32}
_SHARD = re.compile(r"^shard-(\d{6})\.json$")


def frozen_groups(model: GeoLocNet, train_stages: int) -> int:
    """How many backbone groups (from the input) stay frozen with ``train_stages`` trainable."""
    n = len(model.backbone.trainable_groups())
    return n - min(max(int(train_stages), 0), n)


def why_not_cacheable(model: GeoLocNet, train_stages: int) -> str | None:
    """None when the trunk cache applies to this model and schedule, else the reason it does not."""
    if frozen_groups(model, train_stages) == 0:
        return "every backbone group trains (--train-stages covers the whole backbone)"
    bb = model.backbone
    if type(bb).forward_until is Backbone.forward_until:
        return f"backbone {bb.name} cannot split its forward pass"
    return None


class CachedTrunkNet(nn.Module):
    """``model`` continued from a cached trunk state: trainable groups, head and whitening.

    A module of its own so that DistributedDataParallel can wrap it (its parameters are the
    model's)."""

    def __init__(self, model: GeoLocNet, stop: int):
        super().__init__()
        self.model = model
        self.stop = stop

    def forward(self, state: dict[str, torch.Tensor]) -> dict:
        return self.model.forward_taps(self.model.backbone.forward_from(state, self.stop))


def image_key(path: str | Path) -> str:
    """Identity of an image file for the cache: resolved path, size and modification time."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as err:
        raise InputError(p, f"cannot read ({err.strerror or err})") from None
    return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"


class TrunkCache:
    """The frozen part of ``model``'s backbone for images at ``size``, on disk under ``root``.

    ``build(paths, load)`` fills it (only the images it lacks); ``batch(ids)`` then returns the
    trunk state of images by their index into ``paths``, ready for :class:`CachedTrunkNet`.
    """

    def __init__(
        self,
        root: str | Path,
        model: GeoLocNet,
        stop: int,
        size: tuple[int, int],
        dtype: str = "float16",
        shard_rows: int = SHARD_ROWS,
    ):
        if dtype not in DTYPES:
            raise HaflocError(f"trunk cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if not 1 <= stop <= len(model.backbone.trainable_groups()):
            raise HaflocError(f"trunk cache: {stop} frozen group(s) is not a split of {model.backbone.name}")
        self.model, self.stop, self.size = model, int(stop), (int(size[0]), int(size[1]))
        self.dtype = DTYPES[dtype]
        self.shard_rows = max(1, int(shard_rows))
        self.used = frozenset(model.head.levels)
        every = frozenset(LEVELS)
        self._blank: dict[str, torch.Tensor] | None = None
        self._settle(Path(root), dtype, self.used)
        if self.used != every and not self._built():
            # a level ablation reads the cache of every level when there is one: the taps it needs
            # are a subset of those rows, so the run is the same without computing them again
            self._settle(Path(root), dtype, every)
            if self._built():
                log.info(
                    "trunk cache: levels %s read from the cache of every level, %s", sorted(self.used), self.folder
                )
            else:
                self._settle(Path(root), dtype, self.used)
        self._locs: np.ndarray | None = None  # (N, 2): shard number, row; per index into build's paths
        self._maps: dict[int, np.ndarray] = {}

    # -- what is stored --------------------------------------------------------------------
    def _settle(self, root: Path, dtype: str, keep: frozenset[str]) -> None:
        """Store the taps of levels ``keep``: fields, row length, key and folder."""
        self.keep = keep
        self.fields, self.alias = self._layout()
        self.row_len = sum(int(np.prod(shape)) for _, shape in self.fields)
        self.key = self._fingerprint(dtype)
        self.folder = root / f"{self.model.backbone.name}-{self.key}"

    def _built(self) -> bool:
        return (self.folder / "meta.json").is_file()

    def _frozen_state(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._kept(self._frozen_pass(x))

    def _kept(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if k == "carry" or k not in LEVELS or k in self.keep}

    def _frozen_pass(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        bb = self.model.backbone
        # as in training, frozen groups run in eval mode (BatchNorm keeps its statistics); each
        # module's own mode is restored after (the groups are fresh containers without one)
        modes = [(m, m.training) for g in bb.trainable_groups()[: self.stop] for m in g.modules()]
        for m, _ in modes:
            m.training = False
        try:
            with torch.inference_mode():
                state = bb.forward_until(x, self.stop)
        finally:
            for m, mode in modes:
                m.training = mode
        return state

    def _layout(self) -> tuple[list[tuple[str, tuple[int, ...]]], dict[str, str]]:
        """Stored fields (name, per-image shape) and aliases (carry -> the tap it is)."""
        if self._blank is None:  # one frozen pass, whichever levels are weighed: only its shapes are read
            device = next(self.model.parameters()).device
            self._blank = self._frozen_pass(torch.zeros(1, 3, *self.size, device=device))
        state = self._kept(self._blank)
        alias = {"carry": k for k, v in state.items() if k != "carry" and v is state["carry"]}
        fields = [(k, tuple(v.shape[1:])) for k, v in sorted(state.items()) if k not in alias]
        return fields, alias

    def _fingerprint(self, dtype: str) -> str:
        bb = self.model.backbone
        desc = {
            "version": VERSION,
            "class": type(bb).__name__,
            "backbone": bb.name,
            "frozen_groups": self.stop,
            "size": list(self.size),
            "dtype": dtype,
            "fields": [[k, list(s)] for k, s in self.fields],
            "alias": self.alias,
        }
        h = hashlib.sha256(json.dumps(desc, sort_keys=True).encode())
        for name, buf in sorted(bb.named_buffers(recurse=False)):  # normalisation constants
            h.update(name.encode())
            h.update(buf.detach().cpu().float().contiguous().numpy().tobytes())
        for i, g in enumerate(bb.trainable_groups()[: self.stop]):
            for name, v in sorted(g.state_dict().items()):
                h.update(f"{i}.{name}".encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # -- disk ------------------------------------------------------------------------------
    def _index(self) -> dict[str, tuple[int, int]]:
        """Image key -> (shard, row) over the committed shards."""
        index: dict[str, tuple[int, int]] = {}
        if not self.folder.is_dir():
            return index
        for p in sorted(self.folder.iterdir()):
            m = _SHARD.match(p.name)
            if not m:
                continue
            try:
                keys = json.loads(p.read_text(encoding="utf-8"))["images"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise InputError(
                    p, f"damaged trunk-cache shard index ({err}); delete {self.folder} to rebuild"
                ) from None
            for row, k in enumerate(keys):
                index.setdefault(k, (int(m.group(1)), row))
        return index

    def _shard_path(self, n: int, ext: str) -> Path:
        return self.folder / f"shard-{n:06d}.{ext}"

    def _write_shard(self, n: int, keys: list[str], rows: np.ndarray) -> None:
        with atomic_path(self._shard_path(n, "npy")) as tmp:
            np.save(tmp, rows)
        write_json_atomic(self._shard_path(n, "json"), {"images": keys})  # the commit marker

    def build(
        self,
        paths: Sequence[str | Path],
        load: Callable[[int], torch.Tensor],
        ids: Sequence[int] | None = None,
        batch_size: int = 16,
        workers: int = 2,
        progress: bool = True,
    ) -> dict:
        """Make the images ``paths[i]`` for ``i`` in ``ids`` (default: all) available to :meth:`batch`;
        ``load(i)`` -> (3,H,W) in [0, 1] of ``paths[i]`` at the cache's size. Computes only what the
        folder lacks; returns {"images", "computed", "seconds", "folder"}."""
        t0 = time.monotonic()
        ids = list(range(len(paths))) if ids is None else sorted({int(i) for i in ids})
        key_of = {i: image_key(paths[i]) for i in ids}
        keys = list(key_of.values())
        self.folder.mkdir(parents=True, exist_ok=True)
        with os_lock(self.folder / ".lock"):
            for stale in self.folder.glob(".shard-*.partial.*"):  # left by a killed builder; we hold the lock
                stale.unlink(missing_ok=True)
            if not (self.folder / "meta.json").is_file():
                write_json_atomic(
                    self.folder / "meta.json",
                    {
                        "version": VERSION,
                        "backbone": self.model.backbone.name,
                        "frozen_groups": self.stop,
                        "size": list(self.size),
                        "dtype": np.dtype(self.dtype).name,
                        "fields": [[k, list(s)] for k, s in self.fields],
                        "alias": self.alias,
                    },
                )
            index = self._index()
            todo_keys = list(dict.fromkeys(k for k in keys if k not in index))  # one row per distinct file
            first = {k: i for i, k in reversed(list(key_of.items()))}
            n_next = 1 + max((s for s, _ in index.values()), default=0)
            bar = tqdm(
                total=len(todo_keys),
                desc="train: trunk cache",
                unit="img",
                disable=not progress or not todo_keys,
                dynamic_ncols=True,
            )
            for s in range(0, len(todo_keys), self.shard_rows):
                chunk = todo_keys[s : s + self.shard_rows]
                rows = np.empty((len(chunk), self.row_len), self.dtype)
                pos = 0
                for ev in run_batches(_Rows(self), [first[k] for k in chunk], load, batch_size, workers=workers):
                    if not isinstance(ev, Batch):
                        raise InputError(paths[ev.item], ev.error.cause)
                    rows[pos : pos + len(ev.items)] = ev.outputs["rows"]
                    pos += len(ev.items)
                    bar.update(len(ev.items))
                self._write_shard(n_next, chunk, rows)
                index.update({k: (n_next, r) for r, k in enumerate(chunk)})
                n_next += 1
            bar.close()
        self._locs = np.full((len(paths), 2), -1, dtype=np.int64)
        for i, k in key_of.items():
            self._locs[i] = index[k]
        self._maps.clear()
        seconds = time.monotonic() - t0
        if todo_keys:
            log.info("trunk cache: %d image(s) computed in %.1f s (%s)", len(todo_keys), seconds, self.folder)
        return {
            "images": len(keys),
            "computed": len(todo_keys),
            "seconds": round(seconds, 2),
            "folder": str(self.folder),
        }

    def rows(self, x: torch.Tensor) -> np.ndarray:
        """Cache rows (B, row_len) of an image batch (B,3,H,W) in [0, 1] at the cache's size."""
        state = self._frozen_state(x.to(next(self.model.parameters()).device))
        flat = [state[k].reshape(len(x), -1).float().cpu().numpy() for k, _ in self.fields]
        return np.concatenate(flat, axis=1).astype(self.dtype)

    def _shard(self, n: int) -> np.ndarray:
        m = self._maps.get(n)
        if m is None:
            path = self._shard_path(n, "npy")
            try:
                m = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise InputError(
                    path, f"unreadable trunk-cache shard ({err}); delete {self.folder} to rebuild"
                ) from None
            if m.shape[1:] != (self.row_len,) or m.dtype != self.dtype:
                raise InputError(
                    path,
                    f"trunk-cache shard of shape {m.shape} {m.dtype}, expected rows of "
                    f"{self.row_len} {np.dtype(self.dtype).name}; delete {self.folder} to rebuild",
                )
            self._maps[n] = m
        return m

    def batch(self, ids: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Trunk state (float32 tensors, batch first) of images by their index into ``build``'s paths."""
        if self._locs is None:
            raise HaflocError("trunk cache: build() first")
        ids = np.asarray(ids, dtype=np.int64).ravel()
        locs = self._locs[ids]
        if len(locs) and locs[:, 0].min() < 0:
            raise HaflocError(f"trunk cache: image(s) {ids[locs[:, 0] < 0][:3].tolist()} were not built")
        out = np.empty((len(ids), self.row_len), self.dtype)
        for n in np.unique(locs[:, 0]).tolist():
            sel = np.flatnonzero(locs[:, 0] == n)
            out[sel] = self._shard(n)[locs[sel, 1]]
        flat = torch.from_numpy(out).float()
        state: dict[str, torch.Tensor] = {}
        off = 0
        for k, shape in self.fields:
            size = int(np.prod(shape))
            state[k] = flat[:, off : off + size].reshape(len(ids), *shape).contiguous()
            off += size
        for k, target in self.alias.items():
            state[k] = state[target]
        for k in self.keep - self.used:  # stored for another model (a cache of every level)
            state.pop(k, None)
        return state

    def close(self) -> None:
        self._maps.clear()


class _Rows:
    """The cache's frozen pass as a ``runtime.Runner`` (so ``run_batches`` decodes ahead)."""

    outputs: tuple[str, ...] = ("rows",)

    def __init__(self, cache: TrunkCache):
        self.cache = cache

    def __call__(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        return {"rows": self.cache.rows(batch)}
