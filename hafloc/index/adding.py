"""Adding images to an index: describe them in chunks (resumable: what is committed is skipped by
the next run), fit the compact projection on the first ones, commit each chunk with its rows."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from hafloc.descriptors.result import ExtractResult
from hafloc.errors import InputError, ModelMismatchError
from hafloc.fileio import file_sha1, write_json_atomic
from hafloc.index.compact import PROJECTION_FILE, Projection, fit_sample_size
from hafloc.index.positions import Position, _position_columns, resolve_position
from hafloc.index.published import SearchFiles
from hafloc.index.storebase import _now, db_text, py_text

if TYPE_CHECKING:
    from hafloc.local import LocalFeatures


def local_of(result: Any) -> "dict[str, LocalFeatures]":
    """The local features an extraction result carries ({} for a global-only extractor)."""
    return dict(getattr(result, "local", None) or {})


# extract_fn(paths, names) -> result with .names / .descriptors (N, D) / .failures [(name, reason)].
# It may also have ``prefetch([(paths, names), ...])``: ``add`` then announces every chunk it will ask
# for, in order, before asking (``hafloc.index.distributed`` describes them ahead on a cluster).
ExtractFn = Callable[[list[Path], list[str]], ExtractResult]


# The extraction result of callbacks that are not the model Extractor: the same record.
Extracted = ExtractResult


def extractor_fn(extractor: Any, local: Any = None) -> ExtractFn:
    """Adapt ``hafloc.descriptors.extract.Extractor`` to the store's callback (the store shows progress).

    ``local``: a ``hafloc.local`` extractor; its features of every image described globally go
    with the chunk. An image whose local extraction fails is reported and left for the next run.
    """
    if local is None:
        return lambda paths, names: extractor.extract_paths(paths, names=names, progress=False)

    def run(paths: list[Path], names: list[str]) -> Extracted:
        res = extractor.extract_paths(paths, names=names, progress=False)
        by_name = dict(zip(names, paths))
        feats: dict[str, LocalFeatures] = {}
        failures = list(res.failures)
        for name in res.names:
            try:
                feats[name] = local.extract(extractor.load(by_name[name]))
            except InputError as err:
                failures.append((name, err.cause))
        keep = [i for i, n in enumerate(res.names) if n in feats]
        return Extracted([res.names[i] for i in keep], res.descriptors[keep], failures, feats)

    return run


@dataclass
class AddReport:
    added: int = 0
    skipped_existing: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    unpositioned: list[str] = field(default_factory=list)  # relative paths indexed without position
    invalid_positions: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why): indexed unpositioned
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path, indexed path with the same content)


class Adding(SearchFiles):
    """``add``: index images, skipping those already indexed, one committed chunk at a time."""

    def add(
        self,
        paths: Iterable[str | Path],
        root: str | Path,
        extract_fn: ExtractFn,
        positions: dict[str, tuple[float, float]] | None = None,
        chunk_size: int = 64,
        progress: bool = True,
        rebuild: bool = True,
    ) -> AddReport:
        """Index ``paths`` (absolute, or relative to ``root``), skipping those already indexed.

        ``positions`` ({image: (lat, lon)}, e.g. from ``read_positions_csv``) take priority over
        '@' names and EXIF GPS. Images that fail extraction are reported, not indexed, and retried
        by the next ``add``. Holds the write lock throughout.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        with self._writing():
            return self._add(paths, Path(root).resolve(), extract_fn, positions, chunk_size, progress, rebuild)

    def _abs_paths(self) -> dict[str, int]:
        """{absolute path of an indexed image: id}."""
        return {
            os.path.join(py_text(r), py_text(p)): int(i) for i, r, p in self._query("SELECT id, root, path FROM images")
        }

    def _add(
        self,
        paths: Iterable[str | Path],
        root: Path,
        extract_fn: ExtractFn,
        positions: dict[str, tuple[float, float]] | None,
        chunk_size: int,
        progress: bool,
        rebuild: bool,
    ) -> AddReport:
        report = AddReport()
        todo: list[tuple[Path, str]] = []
        seen: set[str] = set()
        existing = self._abs_paths()  # by absolute path: a nested root does not index a file twice
        for p in paths:
            abs_p = Path(os.path.abspath(Path(p) if Path(p).is_absolute() else root / p))
            try:
                rel = abs_p.relative_to(root).as_posix()
            except ValueError:
                report.failed.append((str(p), f"not inside the indexed root {root}"))
                continue
            if str(abs_p) in seen:
                continue
            seen.add(str(abs_p))
            if str(abs_p) in existing:
                report.skipped_existing += 1
            else:
                todo.append((abs_p, rel))
        (self.folder / "chunks").mkdir(exist_ok=True)
        self._remove_orphan_chunks()

        prefetch = getattr(extract_fn, "prefetch", None)
        if prefetch is not None:  # e.g. a Ray actor pool: describes chunks ahead, in parallel; committed below in order
            prefetch(
                [
                    ([a for a, _ in todo[s : s + chunk_size]], [r for _, r in todo[s : s + chunk_size]])
                    for s in range(0, len(todo), chunk_size)
                ]
            )
        bar = tqdm(total=len(todo), desc="indexing", unit="img", disable=not progress or not todo)
        first = 0
        if todo and self.info.get("projection") and not self.info["projection"].get("fitted_on"):
            first = self._fit_projection(todo, root, extract_fn, positions, report, chunk_size, bar)
        for start in range(first, len(todo), chunk_size):
            batch = todo[start : start + chunk_size]
            self._add_chunk(batch, root, extract_fn, positions, report)
            bar.update(len(batch))
        bar.close()
        self._write_info()
        if rebuild:
            self._progress = progress  # an on-disk search build shows its progress too
            self.rebuild_search()
        return report

    def _fit_projection(
        self,
        todo: list[tuple[Path, str]],
        root: Path,
        extract_fn: ExtractFn,
        positions: dict[str, tuple[float, float]] | None,
        report: AddReport,
        chunk_size: int,
        bar: tqdm,
    ) -> int:
        """Describe the first images (the fit sample), fit the index's PCA-whitening on them and
        store it (atomically, before any row: a rerun reuses it), then commit those images.
        Returns how many of ``todo`` were handled."""
        p = self.info["projection"]
        want = fit_sample_size(int(p["input_dim"]), int(p["dim"]))
        done: list[tuple[Sequence[tuple[Path, str]], ExtractResult]] = []
        got = pos = 0
        while pos < len(todo) and got < want:
            batch = todo[pos : pos + chunk_size]
            res = extract_fn([abs_p for abs_p, _ in batch], [rel for _, rel in batch])
            done.append((batch, res))
            got += len(res.names)
            pos += len(batch)
            bar.update(len(batch))
        parts = [np.asarray(r.descriptors, np.float32) for _, r in done if len(r.names)]
        sample = np.concatenate(parts) if parts else np.zeros((0, self.input_dim), np.float32)
        if sample.ndim != 2 or sample.shape[1] != self.input_dim:
            raise ModelMismatchError(
                f"{self.folder}: extraction gave {sample.shape[-1]}-D descriptors, the index takes "
                f"{self.input_dim}-D ones"
            )
        proj = Projection.fit(sample, int(p["dim"]))
        proj.save(self.folder / PROJECTION_FILE)
        self.info["projection"] = dict(p, fitted_on=int(len(sample)))
        write_json_atomic(self.folder / "index.json", self.info)  # under the write lock (see _writing)
        self._projection = proj
        for sample_batch, res in done:
            self._add_chunk(sample_batch, root, extract_fn, positions, report, result=res)
        return pos

    def _add_chunk(
        self,
        batch: Sequence[tuple[Path, str]],
        root: Path,
        extract_fn: ExtractFn,
        positions: dict[str, tuple[float, float]] | None,
        report: AddReport,
        result: ExtractResult | None = None,
    ) -> None:
        by_name = {rel: abs_p for abs_p, rel in batch}
        if result is None:
            result = extract_fn([abs_p for abs_p, _ in batch], [rel for _, rel in batch])
        report.failed.extend((str(by_name.get(n, n)), reason) for n, reason in result.failures)
        names = list(result.names)
        if not names:
            return
        desc = np.ascontiguousarray(result.descriptors, dtype=np.float32)
        if desc.ndim != 2 or desc.shape != (len(names), self.input_dim):
            raise ModelMismatchError(
                f"{self.folder}: extraction gave descriptors of shape {desc.shape} for {len(names)} images, "
                f"the index holds {self.input_dim}-D descriptors"
            )
        if self.input_dim != self.dim:
            desc = self.project(desc)
        desc = desc.astype(self.dtype)
        rows: list[dict[str, Any]] = []
        keep: list[int] = []
        added_at = _now()
        for i, name in enumerate(names):
            if name not in by_name:
                raise ValueError(f"extraction returned {name!r}, which was not asked for")
            try:
                sha1 = file_sha1(by_name[name])
            except OSError as err:  # vanished or unreadable since it was described
                report.failed.append((str(by_name[name]), f"cannot read file ({err.strerror or err})"))
                continue
            try:
                pos: Position | None = resolve_position(by_name[name], name, positions)
            except ValueError as err:  # e.g. an '@' name with lat 999 or nan: indexed, unpositioned
                report.invalid_positions.append((name, str(err)))
                pos = None
            else:
                if pos is None:
                    report.unpositioned.append(name)
            rows.append(
                {
                    "path": db_text(name),
                    "root": db_text(str(root)),
                    "added_at": added_at,
                    "sha1": sha1,
                    **_position_columns(pos),
                }
            )
            keep.append(i)
        if not rows:
            return
        self._report_duplicates(rows, report)
        data: dict[str, Any] = {"descriptors": desc[keep]}
        if self.local_config:
            local = local_of(result)
            missing = [names[i] for i in keep if names[i] not in local]
            if missing:
                raise ValueError(
                    f"{self.folder}: the index stores local features; extraction gave none for {missing[:3]}"
                )
            data["local"] = [(names[i], local[names[i]]) for i in keep]
        self._commit_chunk(data, rows)
        report.added += len(rows)

    def _report_duplicates(self, rows: list[dict[str, Any]], report: AddReport) -> None:
        """Rows whose content (sha1) is already indexed, or repeated within ``rows``."""
        hashes = sorted({r["sha1"] for r in rows})
        known: dict[str, str] = {}
        for start in range(0, len(hashes), 500):
            part = hashes[start : start + 500]
            for h, r, p in self._query(
                f"SELECT sha1, root, path FROM images WHERE sha1 IN ({','.join('?' * len(part))})", part
            ):
                known.setdefault(h, os.path.join(py_text(r), py_text(p)))
        for r in rows:
            here = os.path.join(py_text(r["root"]), py_text(r["path"]))
            if r["sha1"] in known:
                report.duplicates.append((here, known[r["sha1"]]))
            else:
                known[r["sha1"]] = here
