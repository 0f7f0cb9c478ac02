"""hloc's HDF5 layout, written safely: one group per image name, datasets inside.

hloc (cvg/Hierarchical-Localization) keeps features in a file with one group per image name;
a name containing '/' becomes nested groups (h5py creates the intermediate ones) and hloc lists
the names as the parents of datasets. Pairs live in a match file under
``names_to_pair(q, db) = q.replace('/', '-') + '/' + db.replace('/', '-')``.

Every write replaces the file atomically (a killed writer leaves the old file intact, never a
damaged one), and concurrent appenders of the same file are serialised by a lock beside it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping

import filelock
import h5py
import numpy as np

from .errors import InputError
from .fileio import atomic_path, os_lock


def h5_name(name: str) -> str | bytes:
    """The group path of an image name (leading/trailing '/' dropped); refuses an empty name.

    A name that is not UTF-8 (surrogate-escaped, as ``os.fsdecode`` gives it) becomes its raw
    bytes: h5py stores them losslessly (and returns ``bytes`` keys for such groups).
    """
    key = str(name).strip("/")
    if not key:
        raise ValueError(f"image name {name!r} cannot be an HDF5 group name")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(key)
    return key


def names_to_pair(name0: str, name1: str, separator: str = "/") -> str:
    """hloc's key of a pair in a match file (its ``hloc.utils.parsers.names_to_pair``)."""
    return separator.join((name0.replace("/", "-"), name1.replace("/", "-")))


def _lock(path: Path) -> filelock.BaseFileLock:
    return os_lock(path.with_name(f".{path.name}.lock"))


def write_h5_groups(
    path: str | Path, groups: Iterable[tuple[str, Mapping[str, np.ndarray]]], append: bool = False
) -> None:
    """Write ``(name, {dataset: array})`` groups in hloc's layout.

    ``append=False`` replaces the file; ``append=True`` keeps the groups already in it (a group
    written again is replaced, as hloc does). Either way the new file appears atomically:
    appending copies the file first, so its cost grows with the file's size.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Appending reads the old file: concurrent appenders take turns. A replacement needs no lock
    # (the rename is atomic; the last writer wins) and leaves no lock file beside the target.
    with _lock(path) if append else contextlib.nullcontext(), atomic_path(path) as tmp:
        if append and path.exists():
            shutil.copyfile(path, tmp)
            mode = "a"
        else:
            mode = "w"
        with h5py.File(tmp, mode, libver="latest") as fd:
            for name, datasets in groups:
                key = h5_name(name)
                if mode == "a":  # a group written again replaces the old one
                    try:
                        del fd[key]
                    except KeyError:
                        pass
                grp = fd.create_group(key)
                for dname, data in datasets.items():
                    grp.create_dataset(dname, data=data)


def list_h5_names(path: str | Path) -> list[str]:
    """Image names in an hloc feature file, the way hloc finds them (parents of datasets), in file order."""
    names: list[str] = []
    try:
        with h5py.File(path, "r") as fd:
            fd.visititems(
                lambda _, obj: names.append(obj.parent.name.strip("/")) if isinstance(obj, h5py.Dataset) else None
            )
    except OSError as err:
        raise InputError(path, f"not a readable HDF5 file ({err})") from None
    return list(dict.fromkeys(names))
