"""Batched, resumable descriptor extraction from image files.

Images keep their aspect ratio (longest side ``max_side``, both sides multiples of 32), so a
batch holds images of one size: we bucket by size and run a bucket when it is full. Decoding
runs in a small thread pool ahead of the network (PIL releases the GIL while decoding).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..errors import HaflocError, InputError
from ..fileio import atomic_path
from ..hloc_h5 import write_h5_groups
from ..images.io import list_images, load_image, to_tensor
from .network import GeoLocNet

log = logging.getLogger(__name__)

Runner = Callable[[torch.Tensor], dict]


@dataclass
class ExtractResult:
    names: list[str]
    descriptors: np.ndarray  # (N, D) float32, L2-normalised
    failures: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def torch_runner(model: GeoLocNet) -> Runner:
    # channels_last: 1.35-1.5x faster eager convolutions on CPU (benchmarks/extract.py)
    model.eval().to(memory_format=torch.channels_last)

    def run(batch: torch.Tensor) -> dict:
        with torch.inference_mode():
            out = model(batch.contiguous(memory_format=torch.channels_last))
        return {"descriptor": out["descriptor"].numpy(),
                "attention": {lv: a[:, 0].numpy() for lv, a in out["attention"].items()}}

    return run


class Extractor:
    """Turns images into global descriptors with one model.

    ``backend``: "torch" (eager), "onnx" (ONNX Runtime) or "auto" (ONNX Runtime when installed).
    ``exif_transpose``: apply EXIF orientation when loading files (INRIA Holidays "orig" must not).
    ``max_size``: (w, h) bound a file is first downscaled into, either orientation (Holidays:
    1024x768), before the usual ``max_side`` resizing.
    """

    def __init__(self, model: GeoLocNet, batch_size: int = 8, max_side: int | None = None,
                 backend: str = "torch", num_threads: int | None = None, image_size: tuple[int, int] | None = None,
                 exif_transpose: bool = True, max_size: tuple[int, int] | None = None):
        self.model = model
        self.batch_size = max(1, batch_size)
        self.max_side = max_side or model.config.max_side
        self.image_size = image_size  # fixed (H, W) instead of aspect-kept resizing
        self.exif_transpose = exif_transpose
        self.max_size = tuple(max_size) if max_size else None
        torch.set_num_threads(num_threads or default_threads())
        self.backend = backend
        self.run = self._make_runner(backend)

    def _make_runner(self, backend: str) -> Runner:
        if backend == "torch":
            return torch_runner(self.model)
        try:
            from .onnx_backend import onnx_runner
        except ImportError as err:
            if backend == "auto":
                return torch_runner(self.model)
            raise HaflocError(f"ONNX backend unavailable: {err}") from None
        if backend in ("onnx", "auto"):
            return onnx_runner(self.model, fallback_ok=backend == "auto")
        raise HaflocError(f"unknown backend {backend!r}; choose torch, onnx or auto")

    def prepare(self, img: Image.Image) -> torch.Tensor:
        return to_tensor(img, size=self.image_size, max_side=self.max_side)

    def load(self, path: Path, crop_box: tuple | None = None) -> Image.Image:
        """A file as the extractor sees it: EXIF per ``exif_transpose``, ``max_size`` bound, then crop.

        The crop box is in the coordinates of the file as distributed (Oxford/Paris boxes), so
        it is scaled along when ``max_size`` shrinks the image.
        """
        img = load_image(path, exif_transpose=self.exif_transpose)
        scale = 1.0
        if self.max_size:
            long_b, short_b = max(self.max_size), min(self.max_size)
            scale = min(1.0, long_b / max(img.size), short_b / min(img.size))
            if scale < 1.0:
                img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                                 Image.BILINEAR, reducing_gap=3.0)
        if crop_box is not None:
            x1, y1, x2, y2 = (int(round(v * scale)) for v in crop_box)
            x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, img.width), min(y2, img.height)
            if x2 - x1 < 1 or y2 - y1 < 1:
                raise InputError(path, f"crop box {tuple(crop_box)} lies outside the {img.width}x{img.height} image")
            img = img.crop((x1, y1, x2, y2))
        return img

    def describe_image(self, img: Image.Image) -> dict:
        """One PIL image -> {"descriptor": (D,), "attention": {level: (h, w)}}."""
        out = self.run(self.prepare(img).unsqueeze(0))
        return {"descriptor": out["descriptor"][0], "attention": {k: v[0] for k, v in out["attention"].items()}}

    def extract_paths(self, paths: list[Path], names: list[str] | None = None, progress: bool = True,
                      checkpoint: Path | None = None, crop_boxes: dict[int, tuple] | None = None,
                      done: dict[str, np.ndarray] | None = None, checkpoint_every: float = 30.0) -> ExtractResult:
        """Extract every path; unreadable files are skipped and listed in ``failures``.

        ``checkpoint``: a file to which finished descriptors are saved every ``checkpoint_every``
        seconds (atomically); rerunning with the same checkpoint skips what it holds.
        ``crop_boxes``: {index: (x1, y1, x2, y2)} crops applied before resizing (Oxford "crop").
        """
        names = names or [str(p) for p in paths]
        results: dict[str, np.ndarray] = dict(done or {})
        failures: dict[str, str] = {}
        fingerprint = self.model.fingerprint() if checkpoint is not None else ""
        if checkpoint is not None:
            prev, prev_fail = _load_checkpoint(checkpoint, fingerprint)
            results.update(prev)
            failures.update(prev_fail)
        todo = [i for i, n in enumerate(names) if n not in results and n not in failures]
        buckets: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        last_save = time.monotonic()

        def flush(key: tuple[int, int]) -> None:
            items = buckets.pop(key)
            batch = torch.stack([t for _, t in items])
            desc = self.run(batch)["descriptor"]
            for (i, _), d in zip(items, desc):
                results[names[i]] = d.astype(np.float32)

        def load(i: int) -> torch.Tensor:
            return self.prepare(self.load(paths[i], crop_boxes.get(i) if crop_boxes else None))

        bar = tqdm(total=len(names), initial=len(names) - len(todo), disable=not progress,
                   desc="extract", unit="img", dynamic_ncols=True)
        with ThreadPoolExecutor(max_workers=2) as pool:
            for i, fut in _ahead(pool, load, todo, window=2 * self.batch_size):
                try:
                    t = fut.result()
                except InputError as err:
                    failures[names[i]] = err.cause
                    log.warning("skipped %s", err)
                    bar.update(1)
                    continue
                key = tuple(t.shape[-2:])
                buckets.setdefault(key, []).append((i, t))
                if len(buckets[key]) >= self.batch_size:
                    n = len(buckets[key])
                    flush(key)
                    bar.update(n)
                if checkpoint is not None and time.monotonic() - last_save > checkpoint_every:
                    _save_checkpoint(checkpoint, fingerprint, results, failures)
                    last_save = time.monotonic()
            for key in list(buckets):
                n = len(buckets[key])
                flush(key)
                bar.update(n)
        bar.close()
        ok = [n for n in names if n in results]
        desc = np.stack([results[n] for n in ok]) if ok else np.zeros((0, self.model.out_dim), np.float32)
        return ExtractResult(ok, desc, [(n, failures[n]) for n in names if n in failures])


def _ahead(pool: ThreadPoolExecutor, fn, items: list[int], window: int) -> Iterable:
    """Yield (item, future) in order, keeping ``window`` loads in flight."""
    futures: list = []
    it = iter(items)
    for i in it:
        futures.append((i, pool.submit(fn, i)))
        if len(futures) >= window:
            break
    while futures:
        yield futures.pop(0)
        nxt = next(it, None)
        if nxt is not None:
            futures.append((nxt, pool.submit(fn, nxt)))


def _save_checkpoint(path: Path, fingerprint: str, results: dict, failures: dict) -> None:
    names = list(results)
    if not names:
        return
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, fingerprint=fingerprint, names=np.array(names, dtype=str),
                 descriptors=np.stack([results[n] for n in names]),
                 fail_names=np.array(list(failures), dtype=str), fail_reasons=np.array(list(failures.values()), dtype=str))


def _load_checkpoint(path: Path, fingerprint: str) -> tuple[dict, dict]:
    if not path.exists():
        return {}, {}
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                log.warning("ignoring %s: written by another model", path)
                return {}, {}
            res = dict(zip(z["names"].tolist(), z["descriptors"]))
            fail = dict(zip(z["fail_names"].tolist(), z["fail_reasons"].tolist()))
    except Exception as err:  # a damaged checkpoint only costs a recomputation
        log.warning("ignoring unreadable checkpoint %s (%s)", path, err)
        return {}, {}
    log.info("resuming: %d images already extracted", len(res))
    return res, fail


def write_descriptors(path: Path, names: list[str], descriptors: np.ndarray) -> Path:
    """``.npz`` (names, descriptors) or hloc-layout ``.h5`` (a group per name with ``global_descriptor``)."""
    path = Path(path)
    if path.suffix == ".npz":
        with atomic_path(path) as tmp:
            np.savez(tmp, names=np.array(names, dtype=str), descriptors=descriptors.astype(np.float32))
    elif path.suffix in (".h5", ".hdf5"):
        write_h5_groups(path, ((n, {"global_descriptor": d.astype(np.float32)}) for n, d in zip(names, descriptors)))
    else:
        raise HaflocError(f"{path}: output must end in .npz or .h5")
    return path


def extract_to_file(extractor: Extractor, inputs: list[str | Path], output: Path, progress: bool = True,
                    checkpoint_every: float = 30.0) -> ExtractResult:
    """Files/folders -> descriptor file; names relative to the folder given (sub-folders kept).

    Resumable: progress is checkpointed beside ``output`` and picked up by a rerun.
    """
    pairs = list_images(inputs)
    if not pairs:
        raise HaflocError("no images found in " + ", ".join(map(str, inputs)))
    paths = [p for p, _ in pairs]
    names = [p.relative_to(root).as_posix() for p, root in pairs]
    if len(set(names)) != len(names):  # two folders with the same relative layout
        names = [p.as_posix() for p in paths]
    ckpt = Path(str(output) + ".resume.npz")
    res = extractor.extract_paths(paths, names, progress=progress, checkpoint=ckpt, checkpoint_every=checkpoint_every)
    if res.names:
        write_descriptors(output, res.names, res.descriptors)
    ckpt.unlink(missing_ok=True)
    return res
