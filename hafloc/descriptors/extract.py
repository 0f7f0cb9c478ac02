"""Batched, resumable descriptor extraction from image files.

Images keep their aspect ratio (longest side ``max_side``, both sides multiples of 32); the
batching (decode ahead in a small thread pool, group by size) is ``runtime.run_batches``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..errors import HaflocError, InputError
from ..fileio import atomic_path
from ..hloc_h5 import write_h5_groups
from ..images.io import list_images, load_image, to_tensor
from .network import GeoLocNet
from .result import ExtractResult
from .runtime import Batch, Runner, make_runner, run_batches

log = logging.getLogger(__name__)


class PathExtractor(Protocol):
    """What ``extract_to_file`` needs: the model Extractor, or a cluster's (``index.distributed``)."""

    def extract_paths(
        self,
        paths: list[Path],
        names: list[str] | None = None,
        progress: bool = True,
        checkpoint: Path | None = None,
        checkpoint_every: float = 30.0,
    ) -> ExtractResult: ...


class Extractor:
    """Turns images into global descriptors with one model.

    ``backend``: "torch" (eager), "onnx" (ONNX Runtime) or "auto" (ONNX Runtime when installed).
    ``exif_transpose``: apply EXIF orientation when loading files (INRIA Holidays "orig" must not).
    ``max_size``: (w, h) bound a file is first downscaled into, either orientation (Holidays:
    1024x768), before the usual ``max_side`` resizing.
    ``num_threads``: ONNX Runtime's thread pool; torch's process-wide thread count is the
    application's to set (``runtime.apply_threads``; the CLI does it from ``--threads``).

    The Extractor owns ``model`` while it uses it: eager torch keeps its weights in channels_last
    memory layout (values unchanged). Each forward pass runs in evaluation mode and leaves the
    model's training flag as it found it.
    """

    def __init__(
        self,
        model: GeoLocNet,
        batch_size: int = 8,
        max_side: int | None = None,
        backend: str = "torch",
        num_threads: int | None = None,
        image_size: tuple[int, int] | None = None,
        exif_transpose: bool = True,
        max_size: tuple[int, int] | None = None,
    ):
        self.model = model
        self.batch_size = max(1, batch_size)
        self.max_side = max_side or model.config.max_side
        self.image_size = image_size  # fixed (H, W) instead of aspect-kept resizing
        self.exif_transpose = exif_transpose
        self.max_size = tuple(max_size) if max_size else None
        self.backend = backend
        # channels_last: 1.35-1.5x faster eager convolutions on CPU (benchmarks/extract.py)
        self.run: Runner = make_runner(model, backend, num_threads, channels_last=True)

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
                img = img.resize(
                    (max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                    Image.Resampling.BILINEAR,
                    reducing_gap=3.0,
                )
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

    def extract_paths(
        self,
        paths: list[Path],
        names: list[str] | None = None,
        progress: bool = True,
        checkpoint: Path | None = None,
        crop_boxes: dict[int, tuple] | None = None,
        done: dict[str, np.ndarray] | None = None,
        checkpoint_every: float = 30.0,
    ) -> ExtractResult:
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
        last_save = time.monotonic()

        def load(i: int) -> torch.Tensor:
            return self.prepare(self.load(paths[i], crop_boxes.get(i) if crop_boxes else None))

        bar = tqdm(
            total=len(names),
            initial=len(names) - len(todo),
            disable=not progress,
            desc="extract",
            unit="img",
            dynamic_ncols=True,
        )
        for ev in run_batches(self.run, todo, load, self.batch_size):
            if isinstance(ev, Batch):
                for i, d in zip(ev.items, ev.outputs["descriptor"]):
                    results[names[i]] = d.astype(np.float32)
                bar.update(len(ev.items))
            else:
                failures[names[ev.item]] = ev.error.cause
                log.warning("skipped %s", ev.error)
                bar.update(1)
            if checkpoint is not None and time.monotonic() - last_save > checkpoint_every:
                _save_checkpoint(checkpoint, fingerprint, results, failures)
                last_save = time.monotonic()
        bar.close()
        ok = [n for n in names if n in results]
        desc = np.stack([results[n] for n in ok]) if ok else np.zeros((0, self.model.out_dim), np.float32)
        return ExtractResult(ok, desc, [(n, failures[n]) for n in names if n in failures])


def _save_checkpoint(path: Path, fingerprint: str, results: dict, failures: dict) -> None:
    names = list(results)
    if not names:
        return
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(
            tmp,
            fingerprint=fingerprint,
            names=np.array(names, dtype=str),
            descriptors=np.stack([results[n] for n in names]),
            fail_names=np.array(list(failures), dtype=str),
            fail_reasons=np.array(list(failures.values()), dtype=str),
        )


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


def extract_to_file(
    extractor: PathExtractor,
    inputs: list[str | Path],
    output: Path,
    progress: bool = True,
    checkpoint_every: float = 30.0,
) -> ExtractResult:
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
