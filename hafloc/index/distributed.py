"""Extraction and index building on a Ray cluster (``--ray [ADDRESS]``).

The driver lists the images and splits them into the store's chunks; a pool of Ray actors (one
model load per actor, the same ``Extractor`` and ``runtime.run_batches`` as one process) describes
chunks ahead, in parallel; the driver receives each chunk's result *in order* and commits it
through ``IndexStore.add`` exactly as the single-process path does (same files, same SQLite rows,
same chunk-commit protocol). Only the driver writes, so a killed driver or worker leaves what the
single-process path leaves, and a rerun finishes with no duplicates. A worker that dies is
restarted by Ray and its chunk described again (``RETRIES``).

Images and the model file are read by the workers **by the same path** as the driver sees them:
they must lie on a shared filesystem (NFS, a cluster volume); each actor stats a sample of them
first and the run stops with a one-line error naming a missing path. Workers need hafloc and its
dependencies installed (the same version as the driver).

Only this module imports Ray, and only the CLI's ``--ray`` imports this module.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import HaflocError
from .store import Extracted, extractor_fn, local_of

RETRIES = 4  # restarts of a dead actor, and resubmissions of the chunk it was describing
AHEAD = 2  # chunks queued per actor: it never waits for the driver between chunks
SAMPLE = 16  # paths each actor stats before describing anything


@dataclass(frozen=True)
class DescribeSpec:
    """What an actor needs to describe images exactly as the single-process path does."""

    model_path: str
    fingerprint: str
    batch_size: int = 8
    max_side: int | None = None
    backend: str = "auto"
    threads: int = 1  # CPUs each actor reserves and its torch / ONNX Runtime thread count
    local: dict[str, Any] | None = None  # {"extractor", "conf"}: also local features (index built with --local)


class Describer:
    """One actor's work: load the model (once per process, lazily: again after a restart), describe chunks."""

    def __init__(self, spec: DescribeSpec):
        from ..images.io import quiet_bomb_warning

        quiet_bomb_warning()  # an actor is a process of its own: the CLI's filter does not reach it
        self.spec = spec
        self._fn: Any = None

    def check(self, sample: Sequence[str]) -> dict[str, Any]:
        """Stat the model file and ``sample`` (images of the job) here; load the model. Returns
        {"host", "pid", "missing": first path not found here or None}."""
        out: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "missing": None}
        for p in [self.spec.model_path, *sample]:
            if not os.path.exists(p):
                out["missing"] = p
                return out
        self._load()
        return out

    def _load(self) -> None:
        from ..descriptors.extract import Extractor
        from ..descriptors.modelfile import load_model
        from ..descriptors.runtime import apply_threads

        s = self.spec
        apply_threads(s.threads)  # this process is ours: its torch pool is the actor's CPUs
        model = load_model(s.model_path)
        if model.fingerprint() != s.fingerprint:
            raise HaflocError(
                f"{s.model_path}: on {socket.gethostname()} this is another model (fingerprint "
                f"{model.fingerprint()[:12]}, the driver's is {s.fingerprint[:12]}); the shared "
                "filesystem must hold the same file for every node"
            )
        local = None
        if s.local:
            from ..local import create_extractor

            local = create_extractor(s.local["extractor"], **s.local.get("conf", {}))
        ex = Extractor(model, batch_size=s.batch_size, max_side=s.max_side, backend=s.backend, num_threads=s.threads)
        self._fn = extractor_fn(ex, local)

    def describe(self, paths: Sequence[str], names: Sequence[str]) -> Extracted:
        if self._fn is None:
            self._load()
        res = self._fn([Path(p) for p in paths], list(names))
        return Extracted(list(res.names), np.asarray(res.descriptors, np.float32), list(res.failures), local_of(res))


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise HaflocError("--ray needs the 'ray' package: pip install 'hafloc[ray]'") from None
    return ray


def _probe(address: str, timeout: float = 5.0) -> None:
    """A clear error now for an address nothing listens on (Ray itself would retry for minutes)."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise HaflocError(f"--ray {address}: not a Ray address (HOST:PORT, ray://HOST:PORT, auto or local)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise HaflocError(
            f"--ray {address}: no Ray cluster reachable there ({err.strerror or err}); "
            "start one with 'ray start --head' or omit ADDRESS for a local instance"
        ) from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


class RayPool:
    """A connection to a Ray cluster (or a new local instance) and an actor pool describing chunks.

    ``address``: None or "local" starts a local instance with ``num_cpus`` CPUs (default: the cores
    this process may use) in a private temporary folder, shut down on ``close``; "auto" finds the
    cluster ``ray start`` made on this machine; HOST:PORT or ray://HOST:PORT an existing cluster.
    ``actors``: default one per ``spec.threads`` CPUs of the cluster.
    """

    def __init__(
        self, spec: DescribeSpec, address: str | None = None, actors: int | None = None, num_cpus: int | None = None
    ):
        self.spec = spec
        self.ray = _ray()
        self._temp: str | None = None
        self.address = address or "local"
        if actors is not None and actors < 1:
            raise HaflocError(f"--ray-actors must be at least 1, got {actors}")
        kw: dict[str, Any] = {"configure_logging": False, "log_to_driver": False}
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home from a user's job
        if self.address == "local":
            from ..descriptors.runtime import default_threads

            self._temp = tempfile.mkdtemp(prefix="hafloc-ray-")  # never another user's /tmp/ray session
            kw.update(num_cpus=num_cpus or default_threads(), include_dashboard=False, _temp_dir=self._temp)
        else:
            resolved: str | None = self.address
            if self.address == "auto":
                try:
                    from ray._private.services import canonicalize_bootstrap_address

                    resolved = canonicalize_bootstrap_address("auto")
                except Exception as err:
                    raise HaflocError(f"--ray auto: {_first_line(err)}") from None
                if resolved is None:
                    raise HaflocError("--ray auto: no Ray cluster started on this machine ('ray start --head')")
            _probe(str(resolved))
        try:
            self.ray.init(address=self.address, **kw)
        except Exception as err:
            self._cleanup()
            raise HaflocError(f"--ray {self.address}: cannot connect to Ray ({_first_line(err)})") from None
        cpus = int(self.ray.cluster_resources().get("CPU", 0))
        nodes = [nd for nd in self.ray.nodes() if nd.get("Alive")]
        biggest = max((int(nd.get("Resources", {}).get("CPU", 0)) for nd in nodes), default=0)
        n = actors or max(1, cpus // max(1, spec.threads))
        if spec.threads > biggest or n * spec.threads > cpus:  # Ray would wait for ever for the CPUs
            self.close()
            raise HaflocError(
                f"--ray {self.address}: {n} actor(s) x {spec.threads} CPU(s) (--threads) do not fit the "
                f"cluster ({cpus} CPU(s), at most {biggest} on one node); lower --ray-actors or --threads"
            )
        cls = self.ray.remote(Describer).options(num_cpus=spec.threads, max_restarts=RETRIES, max_task_retries=RETRIES)
        self.actors = [cls.remote(spec) for _ in range(n)]
        self.nodes = len(nodes)
        self.cpus = cpus

    def check(self, paths: Sequence[str | Path]) -> list[dict[str, Any]]:
        """Every actor stats a sample of ``paths`` (and the model file) and loads the model; a path
        missing on a worker is a one-line HaflocError naming it."""
        paths = [str(p) for p in paths]
        n = len(self.actors)
        # each actor its own evenly spaced sample: together they cover up to n x SAMPLE paths
        samples = [paths[i::n][:: max(1, len(paths[i::n]) // SAMPLE)][:SAMPLE] or paths[:1] for i in range(n)]
        infos = self._get([a.check.remote(s) for a, s in zip(self.actors, samples)])
        for info in infos:
            if info["missing"]:
                raise HaflocError(
                    f"{info['missing']}: not found on Ray worker {info['host']}; images and the model "
                    "must be on a shared filesystem, at the same path on every node"
                )
        return infos

    def _get(self, refs: Any) -> Any:
        """``ray.get`` with worker failures as one-line errors (an actor dead after RETRIES restarts too)."""
        exc = self.ray.exceptions
        try:
            return self.ray.get(refs)
        except exc.RayTaskError as err:
            cause = getattr(err, "cause", None)
            if isinstance(cause, HaflocError):
                raise HaflocError(str(cause)) from None
            raise HaflocError(f"a Ray worker failed: {_first_line(cause or err)}") from None
        except exc.RayError as err:  # an actor dead for good (RayActorError), a crashed worker, a lost node
            raise HaflocError(
                f"a Ray worker died {RETRIES + 1} times ({_first_line(err)}); rerun to resume "
                "(what was committed is kept)"
            ) from None

    def map(self, chunks: Sequence[tuple[Sequence[Path], Sequence[str]]]) -> Iterator[Extracted]:
        """Results of ``chunks`` in their order, described ahead by the actors."""
        fn = self.extract_fn()
        fn.prefetch(chunks)
        for paths, names in chunks:
            yield fn(list(paths), list(names))

    def extract_fn(self) -> "OrderedExtract":
        """The store's ``ExtractFn`` (with ``prefetch``) served by this pool."""
        return OrderedExtract(self)

    def close(self) -> None:
        try:
            if self.ray.is_initialized():
                self.ray.shutdown()
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if self._temp:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        where = "a local Ray instance" if self.address == "local" else f"the Ray cluster at {self.address}"
        return f"{len(self.actors)} actor(s) on {where} ({self.nodes} node(s), {self.cpus} CPU(s))"


@dataclass
class OrderedExtract:
    """Chunks described ahead (``prefetch``), handed back in the order they are asked for.

    Each actor holds at most ``AHEAD`` chunks; a finished chunk frees its actor for the next one,
    so a slow node gets fewer chunks. Results wait on the driver until asked for (at most
    ``AHEAD`` x actors chunks in memory).
    """

    pool: RayPool
    queue: deque = field(default_factory=deque)  # (key, paths, names) not yet submitted
    pending: dict = field(default_factory=dict)  # ref -> (key, actor index)
    done: dict = field(default_factory=dict)  # key -> Extracted
    load: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.load = [0] * len(self.pool.actors)

    def prefetch(self, chunks: Sequence[tuple[Sequence[Path], Sequence[str]]]) -> None:
        self.queue.extend((tuple(names), [str(p) for p in paths], list(names)) for paths, names in chunks)
        self._fill()

    def _fill(self) -> None:
        while self.queue:
            i = min(range(len(self.load)), key=self.load.__getitem__)
            if self.load[i] >= AHEAD:
                return
            key, paths, names = self.queue.popleft()
            self.pending[self.pool.actors[i].describe.remote(paths, names)] = (key, i)
            self.load[i] += 1

    def __call__(self, paths: list[Path], names: list[str]) -> Extracted:
        key = tuple(names)
        if key not in self.done and key not in {k for k, _ in self.pending.values()}:
            if not any(q[0] == key for q in self.queue):  # not announced: describe it next
                self.queue.appendleft((key, [str(p) for p in paths], list(names)))
            else:  # asked for out of order: move it to the front
                item = next(q for q in self.queue if q[0] == key)
                self.queue.remove(item)
                self.queue.appendleft(item)
            self._fill()
        while key not in self.done:
            ready, _ = self.pool.ray.wait(list(self.pending), num_returns=1)
            for ref in ready:
                k, i = self.pending.pop(ref)
                self.load[i] -= 1
                self.done[k] = self.pool._get(ref)
            self._fill()
        return self.done.pop(key)


def start_pool(
    spec: DescribeSpec,
    paths: Sequence[str | Path],
    address: str | None = None,
    actors: int | None = None,
    quiet: bool = False,
) -> RayPool:
    """Connect (or start a local instance), start the actors and check they see ``paths``; says where on stderr."""
    pool = RayPool(spec, address, actors)
    try:
        pool.check(paths)
    except BaseException:
        pool.close()
        raise
    if not quiet:
        print(f"ray: describing with {pool.describe()}", file=sys.stderr, flush=True)
    return pool


class RayExtractor:
    """``Extractor.extract_paths`` on a pool (what ``descriptors.extract.extract_to_file`` calls):
    same names, order, failures and resumable checkpoint as one process."""

    def __init__(self, pool: RayPool, model: Any, chunk_size: int = 64):
        self.pool = pool
        self.model = model
        self.chunk_size = max(1, chunk_size)

    def extract_paths(
        self,
        paths: list[Path],
        names: list[str] | None = None,
        progress: bool = True,
        checkpoint: Path | None = None,
        checkpoint_every: float = 30.0,
        **_ignored: Any,
    ) -> Any:
        import time

        from tqdm import tqdm

        from ..descriptors.extract import ExtractResult, _load_checkpoint, _save_checkpoint

        names = names or [str(p) for p in paths]
        fingerprint = self.model.fingerprint() if checkpoint is not None else ""
        results, failures = _load_checkpoint(checkpoint, fingerprint) if checkpoint is not None else ({}, {})
        todo = [i for i, n in enumerate(names) if n not in results and n not in failures]
        cs = self.chunk_size
        chunks = [
            ([paths[i] for i in todo[s : s + cs]], [names[i] for i in todo[s : s + cs]])
            for s in range(0, len(todo), cs)
        ]
        bar = tqdm(
            total=len(names),
            initial=len(names) - len(todo),
            disable=not progress,
            desc="extract",
            unit="img",
            dynamic_ncols=True,
        )
        last_save = time.monotonic()
        for (_, chunk_names), res in zip(chunks, self.pool.map(chunks)):
            results.update(zip(res.names, np.asarray(res.descriptors, np.float32)))
            failures.update(dict(res.failures))
            bar.update(len(chunk_names))
            if checkpoint is not None and time.monotonic() - last_save > checkpoint_every:
                _save_checkpoint(checkpoint, fingerprint, results, failures)
                last_save = time.monotonic()
        bar.close()
        ok = [n for n in names if n in results]
        desc = np.stack([results[n] for n in ok]) if ok else np.zeros((0, self.model.out_dim), np.float32)
        return ExtractResult(ok, desc, [(n, failures[n]) for n in names if n in failures])


def warm_onnx_cache(model: Any, backend: str) -> None:
    """Export the ONNX graph once, beside the model file, before the actors look for it there
    (otherwise each would export it). Failures are left to the actors' runners to handle."""
    if backend == "torch":
        return
    try:
        from ..descriptors.onnx_backend import cached_export

        cached_export(model)
    except Exception:  # noqa: BLE001 - each actor's make_runner reports or falls back
        pass
