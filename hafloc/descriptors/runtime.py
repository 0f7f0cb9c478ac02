"""One way to run a model on images: runners (eager torch, ONNX Runtime) and the batching iterator.

A runner maps a (B,3,H,W) float tensor of RGB in [0, 1] to a dict of the outputs it was asked
for (``OUTPUTS``). ``run_batches`` decodes images in a small thread pool ahead of the network,
groups them by size (images keep their aspect ratio, so a batch holds one size), runs full
groups and yields each batch with the items it holds. Extraction, cluster fitting, weight tuning
and training all go through these two.

Threads: no code here sets torch's process-wide thread count; the application does (the CLI
from ``--threads``, ``apply_threads``). ``threads`` given to a runner is ONNX Runtime's
per-session pool.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, Protocol, Sequence, TypeVar

import numpy as np
import torch

from ..errors import HaflocError, InputError
from .network import GeoLocNet

log = logging.getLogger(__name__)

# What a runner can be asked for:
#   descriptor (B,D) float32; attention {level: (B,h,w)} float32; level_descriptors [(B,D_l)] float32
#   (VLAD heads); taps {level: (B,C,h,w)} torch tensors on the model's device (the backbone's output;
#   asked for on its own).
OUTPUTS = ("descriptor", "attention", "level_descriptors", "taps")
DEFAULT_OUTPUTS = ("descriptor", "attention")
ONNX_OUTPUTS = frozenset(DEFAULT_OUTPUTS)  # what the exported graph returns


class Runner(Protocol):
    """(B,3,H,W) RGB in [0, 1] -> {output name: value} for the outputs it was made for."""

    outputs: tuple[str, ...]

    def __call__(self, batch: torch.Tensor) -> dict[str, Any]: ...


def default_threads() -> int:
    """The cores this process may use (its CPU affinity where the OS tells it)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def apply_threads(threads: int | None) -> int:
    """Set torch's process-wide intra-op thread count (``None``: every core); for applications only."""
    n = max(1, threads or default_threads())
    torch.set_num_threads(n)
    return n


def _check_outputs(outputs: Sequence[str]) -> tuple[str, ...]:
    outputs = tuple(outputs)
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown or not outputs:
        raise HaflocError(f"unknown runner outputs {unknown or outputs!r}; choose from {', '.join(OUTPUTS)}")
    if "taps" in outputs and len(outputs) > 1:
        raise HaflocError("the 'taps' output (the backbone alone) is asked for on its own")
    return outputs


@contextmanager
def eval_mode(model: torch.nn.Module):
    """``model`` in evaluation mode for the block; a model that was training is put back to training."""
    was_training = model.training
    if was_training:
        model.eval()
    try:
        yield model
    finally:
        if was_training:
            model.train()


class TorchRunner:
    """Eager torch on the model's device, in evaluation mode for each call (the caller's mode is kept).

    ``channels_last``: convert the model's weights to channels_last memory layout once, here
    (1.35-1.5x faster eager convolutions on CPU, benchmarks/extract.py). That changes the layout
    of the caller's tensors, not their values: only an owner of the model (the ``Extractor``)
    asks for it.
    """

    def __init__(self, model: GeoLocNet, outputs: Sequence[str] = DEFAULT_OUTPUTS, channels_last: bool = False):
        self.model = model
        self.outputs = _check_outputs(outputs)
        self.channels_last = channels_last
        if channels_last:
            # torch's stubs omit Module.to(memory_format=...), which torch accepts and documents
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def __call__(self, batch: torch.Tensor) -> dict[str, Any]:
        model = self.model
        device = next(model.parameters()).device
        x = batch.to(device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with eval_mode(model), torch.inference_mode():
            if self.outputs == ("taps",):  # the backbone alone (cluster fitting)
                return {"taps": model.backbone(x)}
            out = model(x)
        res: dict[str, Any] = {}
        for name in self.outputs:
            if name == "descriptor":
                res[name] = out["descriptor"].float().cpu().numpy()
            elif name == "attention":
                res[name] = {lv: a[:, 0].float().cpu().numpy() for lv, a in out["attention"].items()}
            elif name == "level_descriptors":
                levels = out.get("level_descriptors")
                if not levels:
                    raise HaflocError(f"method {model.config.method!r} has no per-level descriptors")
                res[name] = [v.float().cpu().numpy() for v in levels]
        return res


def session_options(num_threads: int | None = None):
    """One intra-op pool over the cores (a model is one sequential chain of big ops)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, num_threads or torch.get_num_threads())
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Threads sleep between ops instead of spinning: extraction decodes images on other threads
    # at the same time, and on a shared machine spinning threads starve each other (measured 2-3x
    # slower under load; see BENCHMARKS.md).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise
    return so


class OnnxRunner:
    """ONNX Runtime on an exported graph (``onnx_backend.export_onnx``): descriptor and attention.

    With ``fallback`` (another runner, eager torch in practice), a runtime failure logs one
    warning and switches to it for good; without, the error is raised as a :class:`HaflocError`.
    """

    outputs = tuple(DEFAULT_OUTPUTS)

    def __init__(self, path: str | Path, num_threads: int | None = None, fallback: Runner | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.session = ort.InferenceSession(
            str(self.path), session_options(num_threads), providers=["CPUExecutionProvider"]
        )
        self.names = [o.name for o in self.session.get_outputs()]
        self.fallback = fallback
        self.failed = False

    def __call__(self, batch: torch.Tensor) -> dict[str, Any]:
        if self.failed and self.fallback is not None:
            return self.fallback(batch)
        x = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        try:
            outs = self.session.run(self.names, {"image": x})
        except Exception as err:
            if self.fallback is None:
                raise HaflocError(
                    f"ONNX Runtime failed on a {tuple(x.shape)} batch ({_first_line(err)}); use --backend torch"
                ) from None
            log.warning(
                "ONNX Runtime failed on a %s batch (%s); using eager torch from now on",
                tuple(x.shape),
                _first_line(err),
            )
            self.failed = True
            return self.fallback(batch)
        res = dict(zip(self.names, outs))
        return {
            "descriptor": res.pop("descriptor"),
            "attention": {k.removeprefix("attention_"): v for k, v in res.items()},
        }


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def make_runner(
    model: GeoLocNet,
    backend: str = "torch",
    threads: int | None = None,
    *,
    outputs: Sequence[str] = DEFAULT_OUTPUTS,
    channels_last: bool = False,
) -> Runner:
    """A runner for ``model``: ``backend`` "torch" (eager), "onnx" (ONNX Runtime, export cached by
    fingerprint; any failure is an error) or "auto" (ONNX Runtime when it can serve, else eager
    torch with one warning). ``threads``: ONNX Runtime's intra-op pool (default: torch's count).
    Outputs the exported graph lacks (``level_descriptors``, ``taps``) need eager torch.
    """
    outputs = _check_outputs(outputs)
    if backend not in ("torch", "onnx", "auto"):
        raise HaflocError(f"unknown backend {backend!r}; choose torch, onnx or auto")

    def eager() -> Runner:
        return TorchRunner(model, outputs, channels_last=channels_last)

    if backend == "torch":
        return eager()
    lenient = backend == "auto"
    if not set(outputs) <= ONNX_OUTPUTS:
        if lenient:
            return eager()
        raise HaflocError(
            f"the ONNX backend returns only {', '.join(sorted(ONNX_OUTPUTS))}, not "
            f"{', '.join(o for o in outputs if o not in ONNX_OUTPUTS)}; use --backend torch"
        )
    try:
        import onnxruntime  # noqa: F401

        from .onnx_backend import cached_export
    except ImportError as err:
        if lenient:
            return eager()
        raise HaflocError(f"ONNX backend unavailable: {err}") from None
    device = next(model.parameters()).device
    if device.type != "cpu":
        if lenient:  # "auto" means ONNX Runtime for CPU inference; a GPU model stays in torch
            return eager()
        raise HaflocError(f"the ONNX backend runs on CPU; this model is on {device} (use --backend torch)")
    try:
        return OnnxRunner(cached_export(model), threads, fallback=eager() if lenient else None)
    except Exception as err:
        if not lenient:
            if isinstance(err, HaflocError):
                raise
            raise HaflocError(
                f"ONNX export/runtime unavailable for this model ({_first_line(err)}); use --backend torch"
            ) from None
        log.warning("ONNX Runtime unavailable for this model (%s); using eager torch", _first_line(err))
        return eager()


# ----------------------------------------------------------------------------- batching

T = TypeVar("T")


@dataclass
class Batch(Generic[T]):
    """One forward pass: ``items`` in the order of the rows of every output."""

    items: list[T]
    outputs: dict[str, Any]


@dataclass
class Skipped(Generic[T]):
    """An item whose image could not be loaded (``error.cause`` says why)."""

    item: T
    error: InputError


def run_batches(
    runner: Runner,
    items: Sequence[T],
    load: Callable[[T], torch.Tensor],
    batch_size: int = 8,
    *,
    workers: int = 2,
    prefetch: int | None = None,
) -> Iterator[Batch[T] | Skipped[T]]:
    """Run ``runner`` over ``items``; ``load(item)`` -> (3,H,W) tensor, decoded in ``workers`` threads.

    Items are grouped by image size; a group runs when it holds ``batch_size`` items, and what is
    left runs at the end (groups in order of first appearance). Within a group the items keep
    their order, and items of one size always do: a set of one size runs in order, in chunks of
    ``batch_size``. An ``InputError`` from ``load`` yields a :class:`Skipped` in the item's place
    (other errors propagate). ``prefetch``: decodes kept in flight (default 2 x ``batch_size``).
    """
    batch_size = max(1, batch_size)
    window = max(1, prefetch or 2 * batch_size)
    groups: dict[tuple, list[tuple[T, torch.Tensor]]] = {}

    def run(key: tuple) -> Batch[T]:
        group = groups.pop(key)
        return Batch([it for it, _ in group], runner(torch.stack([t for _, t in group])))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for item, fut in _ahead(pool, load, items, window):
            try:
                t = fut.result()
            except InputError as err:
                yield Skipped(item, err)
                continue
            key = tuple(t.shape)
            groups.setdefault(key, []).append((item, t))
            if len(groups[key]) >= batch_size:
                yield run(key)
        for key in list(groups):
            yield run(key)


def _ahead(
    pool: ThreadPoolExecutor, fn: Callable[[T], Any], items: Sequence[T], window: int
) -> Iterator[tuple[T, Future]]:
    """Yield (item, future) in order, keeping ``window`` calls in flight."""
    pending: deque[tuple[T, Future]] = deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            yield pending.popleft()
    while pending:
        yield pending.popleft()
