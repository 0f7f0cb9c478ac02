"""requirements.lock covers pyproject.toml: every declared dependency is locked at a version it allows.

scripts/setup.sh installs with the lock as constraints, so a dependency missing from it would be
installed at whatever version is newest that day: after editing pyproject.toml, run scripts/lock.sh.
"""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _locked() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


def test_every_dependency_and_extra_is_locked_at_an_allowed_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in ("test", "docs"):
        declared += project["optional-dependencies"][extra]
    locked = _locked()
    assert len(locked) >= len(declared)
    problems = []
    for spec in declared:
        req = Requirement(spec)
        v = locked.get(canonicalize_name(req.name))
        if v is None:
            problems.append(f"{req.name}: not in requirements.lock")
        elif not req.specifier.contains(v, prereleases=True):
            problems.append(f"{req.name}: locked {v}, pyproject asks {req.specifier}")
    assert not problems, "run scripts/lock.sh: " + "; ".join(problems)


def test_torch_is_locked_to_the_cpu_build() -> None:
    assert _locked()["torch"].local == "cpu"
