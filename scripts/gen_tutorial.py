#!/usr/bin/env python
"""Write the outputs shown in docs/tutorial-own-photos.md from a real run of the page's commands.

    python scripts/gen_tutorial.py [--check] [--keep DIR] [--screenshot]

Lays out a temporary folder as the page does (the 29 Lund photos of the shared data: 27 in
``lund/photos/``, 07.jpg and 21.jpg in ``lund/queries/``; the four photos and ``query.jpg`` of
"Try it in seconds" in ``tiny/``), runs the commands the page shows with this checkout's CLI, and
rewrites what follows each ``<!-- output: NAME -->`` marker: the inside of the fenced block right
after it, or the paragraph right after it (prose that quotes the run's numbers). What depends on
the machine is normalised, so another machine writes the same page: the run's folder reads
``/path/to/lund``, model fingerprints ``<fingerprint>``, durations ``<seconds>``. ``--check``
writes nothing and exits 1 with a diff when the page differs (tests/test_tutorial.py runs it);
``--screenshot`` also retakes docs/img/serve-page.jpg (docs/img/make_screenshots.py).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hafloc.datasets.geo import haversine_m  # noqa: E402
from hafloc.fileio import write_text_atomic  # noqa: E402
from hafloc.images.gps import read_gps  # noqa: E402

PAGE = ROOT / "docs" / "tutorial-own-photos.md"
MARKER = re.compile(r"^<!-- output: ([\w-]+) -->$")
SHOWN_FOLDER = "/path/to/lund"
QUERIES = ("07.jpg", "21.jpg")
WIDTH = 100  # folded JSON lines stay within this many characters where they can


def shared_images() -> Path:
    """The Lund photos of the shared data (../shared/data beside the repo; env HAFLOC_SHARED_DATA overrides)."""
    data = Path(os.environ.get("HAFLOC_SHARED_DATA") or ROOT.parent / "shared" / "data")
    return data / "lund_gps" / "images"


# ----------------------------------------------------------------------------------------- the page


def marked_blocks(text: str) -> dict[str, tuple[int, int]]:
    """NAME -> [start, end) line range that each marker's output fills: the inside of the fence on
    the next line, or else the paragraph there (up to a blank line)."""
    lines = text.split("\n")
    spans: dict[str, tuple[int, int]] = {}
    for i, line in enumerate(lines):
        m = MARKER.match(line.strip())
        if not m:
            continue
        name, first = m.group(1), i + 1
        if name in spans:
            raise ValueError(f"{PAGE.name}:{i + 1}: output '{name}' is marked twice")
        if first < len(lines) and lines[first].startswith("```"):
            end = next((j for j in range(first + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise ValueError(f"{PAGE.name}:{first + 1}: unclosed code block")
            spans[name] = (first + 1, end)
        else:
            end = next((j for j in range(first, len(lines)) if not lines[j].strip()), len(lines))
            if end == first:
                raise ValueError(f"{PAGE.name}:{i + 1}: '{line.strip()}' must be followed by a fence or a paragraph")
            spans[name] = (first, end)
    return spans


def fill(text: str, outputs: dict[str, str]) -> str:
    """``text`` with each marked block replaced by its output; every marker needs one and every output a marker."""
    spans = marked_blocks(text)
    if set(spans) != set(outputs):
        raise ValueError(
            f"{PAGE.name}: outputs without a marker {sorted(set(outputs) - set(spans))}, "
            f"markers without an output {sorted(set(spans) - set(outputs))}"
        )
    lines = text.split("\n")
    for name, (start, end) in sorted(spans.items(), key=lambda kv: -kv[1][0]):
        lines[start:end] = outputs[name].rstrip("\n").split("\n")
    return "\n".join(lines)


def page_diff(text: str, outputs: dict[str, str]) -> str:
    """Unified diff from the page to the page filled with ``outputs`` ('' when they agree)."""
    new = fill(text, outputs)
    return "".join(
        difflib.unified_diff(text.splitlines(keepends=True), new.splitlines(keepends=True), "page", "real run", n=1)
    )


def unshown(text: str, commands: list[str]) -> list[str]:
    """The commands run that the page does not show verbatim (an inline one may wrap)."""
    shown = " ".join(text.split())
    return [c for c in commands if c not in shown]


# ------------------------------------------------------------------------------------- the outputs

BAR_FRAME = re.compile(r"^[^\[\n]*\[[^\]\n]*\]\s*")  # "desc:  40%|####  | 2/5 [00:01<00:02, 1.5img/s]"


def strip_progress(raw: str) -> str:
    """The output without tqdm's progress bars (each frame is written after a carriage return)."""
    lines = []
    for line in raw.split("\n"):
        if "\r" in line:
            head, *frames = line.split("\r")
            line = head + "".join(BAR_FRAME.sub("", f, count=1) for f in frames)
            if not line.strip():
                continue
        lines.append(line)
    return "\n".join(lines)


def fold_json(value: Any, abridge: dict[str, int] | None = None) -> str:
    """JSON as the page shows it: what fits on a line of ``WIDTH`` stays on it, an object of plain
    values that does not is wrapped; ``abridge`` {key: n} lists only the first n items of those lists, then ``...``."""
    abridge = abridge or {}

    def dump(v: Any) -> str:
        return json.dumps(v, ensure_ascii=False, separators=(", ", ": "))

    def fold(v: Any, col: int, indent: int, key: str | None) -> str:
        one = dump(v)
        if not isinstance(v, (dict, list)) or col + len(one) + 1 <= WIDTH or not v:
            return one
        pad = " " * (indent + 2)
        if isinstance(v, dict) and not any(isinstance(x, (dict, list)) for x in v.values()):
            rows, row = [], "{"
            for item in (f"{dump(k)}: {dump(x)}" for k, x in v.items()):
                if row != "{" and col + len(row) + len(item) + 2 > WIDTH:
                    rows.append(row.rstrip())
                    row = " "
                row += item + ", "
            return f"\n{' ' * col}".join([*rows, row[:-2] + "}"])
        if isinstance(v, dict):
            body = [f"{pad}{dump(k)}: {fold(x, indent + 2 + len(dump(k)) + 2, indent + 2, k)}" for k, x in v.items()]
            return "{\n" + ",\n".join(body) + f"\n{' ' * indent}}}"
        items = v[: abridge[key]] if key in abridge else v
        body = ",\n".join(pad + fold(x, indent + 2, indent + 2, None) for x in items)
        if len(items) < len(v):
            body += f",\n{pad}..."
        return f"[\n{body}\n{' ' * indent}]"

    return fold(value, 0, 0, None)


class Run:
    """Runs the page's commands in one folder; its outputs are normalised (see the module)."""

    def __init__(self, folder: Path):
        self.folder = folder.resolve()
        self.env = dict(
            os.environ,
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",  # stdout and stderr interleave as on a terminal
            HAFLOC_CACHE=str(self.folder / ".cache"),
        )
        self.fingerprints: set[str] = set()
        self.commands: list[str] = []  # as the page shows them

    def normalise(self, text: str) -> str:
        text = text.replace(str(self.folder / "lund"), SHOWN_FOLDER).replace(str(self.folder), SHOWN_FOLDER)
        for fp in self.fingerprints:
            text = text.replace(fp, "<fingerprint>").replace(fp[:12], "<fingerprint>")
        text = re.sub(r"\(\d+(\.\d+)? s\)", "(<seconds> s)", text)
        return text.rstrip() + "\n"

    def hafloc(self, command: str, cwd: str = "lund", status: int = 0) -> str:
        """Output (stdout and stderr, without progress bars) of ``command``, a line the page shows,
        run in ``cwd`` (a folder of the run); RuntimeError when it exits other than ``status``."""
        self.commands.append(command)
        argv = shlex.split(command)
        if argv[0] != "hafloc":
            raise ValueError(f"not a hafloc command: {command}")
        proc = subprocess.run(
            [sys.executable, "-m", "hafloc", *argv[1:]],
            cwd=self.folder / cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=3600,
        )
        out = strip_progress(proc.stdout.decode("utf-8", "surrogateescape"))
        if proc.returncode != status:
            raise RuntimeError(f"'{command}' exited {proc.returncode}, not {status}:\n{out[-3000:]}")
        self.fingerprints.update(re.findall(r"fingerprint ([0-9a-f]{16})\b", out))
        return self.normalise(out)

    def json(self, command: str, **kw: Any) -> dict:
        return json.loads(self.hafloc(command, **kw))


TABLE_HEAD = re.compile(r"^(\S.*): (-?[\d.]+), (-?[\d.]+)  \(confidence ([\d.]+), (.*)\)$")
TABLE_ROW = re.compile(r"^\s+\d+\s+([\d.]+)\s+(\d+|-)\s+\S+ k?m\s+\S+\s+\S+  (.+)$")


def parse_table(text: str) -> list[dict[str, Any]]:
    """The photos of ``hafloc locate``'s table: image, lat, lon, confidence, verified and the
    matches (image, similarity, inliers), in the table's order."""
    photos: list[dict[str, Any]] = []
    for line in text.splitlines():
        if head := TABLE_HEAD.match(line):
            image, lat, lon, conf, kind = head.groups()
            verified = kind.endswith(", verified")
            photos.append(dict(image=image, lat=float(lat), lon=float(lon), confidence=float(conf), verified=verified))
            photos[-1]["matches"] = []
        elif row := TABLE_ROW.match(line):
            sim, inliers, image = row.groups()
            photos[-1]["matches"].append(
                dict(image=image, similarity=float(sim), inliers=None if inliers == "-" else int(inliers))
            )
    return photos


def prose(text: str) -> str:
    """A generated paragraph, wrapped as the page's paragraphs are."""
    return textwrap.fill(text, WIDTH, break_long_words=False, break_on_hyphens=False)


def metres(a: tuple[float, float], b: tuple[float, float]) -> float:
    return float(haversine_m(a[0], a[1], b[0], b[1]))


def lay_out(images: Path, folder: Path) -> None:
    """The page's folders: ``lund/`` (photos/ and queries/) and ``tiny/`` (tests/test_docs.py's layout)."""
    shutil.copytree(images, folder / "lund" / "photos")
    (folder / "lund" / "queries").mkdir()
    for q in QUERIES:
        (folder / "lund" / "photos" / q).rename(folder / "lund" / "queries" / q)
    lund = sorted(images.glob("*.jpg"))
    (folder / "tiny" / "photos").mkdir(parents=True)
    for p in lund[:4]:
        shutil.copy(p, folder / "tiny" / "photos" / p.name)
    shutil.copy(lund[4], folder / "tiny" / "query.jpg")


def generate(images: Path, folder: Path, screenshot: bool = False) -> tuple[dict[str, str], list[str]]:
    """(NAME -> output of each marked block, the commands run as the page shows them), from a real run in ``folder``."""
    lay_out(images, folder)
    run, out = Run(folder), {}
    exif = {q: read_gps(images / q) for q in QUERIES}
    positions = {p.name: read_gps(p) for p in images.glob("*.jpg")}
    indexed = [pos for name, pos in positions.items() if name not in QUERIES]

    # 2. a model
    out["model-init"] = run.hafloc(
        "hafloc model init --method haf --images photos/ --output haf.model --clusters 16 --max-side 480"
    )
    info = run.hafloc("hafloc model info haf.model").splitlines()
    out["model-info"] = "\n".join(x for x in info if x.split(":")[0].strip() not in ("created", "meta"))

    # 3. the index
    out["index-build"] = run.hafloc("hafloc index build photos/ --model haf.model --index lund.index --local xfeat")
    out["index-info"] = run.hafloc("hafloc index info lund.index")

    # 4. locate
    out["locate-07"] = run.hafloc("hafloc locate queries/07.jpg --index lund.index --top-k 3")
    (q07,) = parse_table(out["locate-07"])
    out["locate-07-truth"] = prose(
        "The EXIF of 07.jpg, which the index never saw, says {:.6f}, {:.6f}: the estimate is {:.1f} m off.".format(
            *exif["07.jpg"], metres(exif["07.jpg"], (q07["lat"], q07["lon"]))
        )
    )
    out["locate-07-json"] = fold_json(run.json("hafloc locate queries/07.jpg --index lund.index --top-k 3 --json"))
    out["locate-csv"] = run.hafloc("hafloc locate queries/ --index lund.index --format csv")
    out["locate-geojson"] = run.hafloc(
        "hafloc locate queries/ --index lund.index --format geojson --output where.geojson"
    )
    geojson = json.loads(run.normalise((run.folder / "lund" / "where.geojson").read_text()))
    out["where-geojson"] = fold_json(geojson, abridge={"features": 1})

    # 5. re-ranking
    out["locate-21-global"] = run.hafloc("hafloc locate queries/21.jpg --index lund.index --top-k 4 --rerank 0")
    out["locate-21-reranked"] = run.hafloc("hafloc locate queries/21.jpg --index lund.index --top-k 4")
    (glob,), (rer,) = parse_table(out["locate-21-global"]), parse_table(out["locate-21-reranked"])
    before = [m["image"] for m in glob["matches"]]
    # the first match that re-ranking lifts above one that global similarity put before it
    lifted = [
        (m, n)
        for i, m in enumerate(rer["matches"])
        for n in rer["matches"][i + 1 :]
        if before.index(n["image"]) < before.index(m["image"])
    ]
    if not lifted:
        raise RuntimeError("re-ranking no longer reorders 21.jpg's first matches: rewrite section 5's example")
    up, passed = lifted[0]
    up_m = metres(exif["21.jpg"], positions[up["image"]])
    passed_m = metres(exif["21.jpg"], positions[passed["image"]])
    out["locate-21-story"] = prose(
        f"{up['image']}, taken {up_m:.0f} m from where the query was and sharing "
        f"{up['inliers']} verified inliers with it, moves above {passed['image']}, taken "
        f"{passed_m:.0f} m away ({passed['inliers']} inliers). The answer "
        + ("is verified, and lies" if rer["verified"] else "is not verified (see below), though it lies")
        + f" {metres(exif['21.jpg'], (rer['lat'], rer['lon'])):.1f} m from where the photo was taken."
    )

    # 6. calibration
    refused = run.hafloc("hafloc index calibrate --index lund.index", status=2)
    out["calibrate-refused"] = "$ hafloc index calibrate --index lund.index\n" + refused
    out["calibrate-force"] = run.hafloc("hafloc index calibrate --index lund.index --agree-m 10 --force")
    cal = json.loads((run.folder / "lund" / "lund.index" / "calibration.json").read_text())
    spread = max(metres(a, b) for a in indexed for b in indexed)
    if not 0 < cal["positives_rate"] < 1:
        raise RuntimeError("at 10 m the leave-one-out answers are no longer both right and wrong: rewrite section 6")
    out["calibrate-why-10m"] = prose(
        f"They also all lie within {spread:.0f} m of each other, so a 25 m radius is a loose test of them. At "
        f"10 m there are both right and wrong answers, and `--force` fits from the {cal['n_samples']} anyway:"
    )
    heuristic = cal["heldout"]["heuristic"]
    mean_heuristic = sum(heuristic) / len(heuristic)
    out["calibrate-ece"] = prose(
        "The ECE (expected calibration error, on answers held out of the fit) says how far the stated "
        f"probabilities are from the observed frequencies: {cal['ece_heldout']:.3f} here, "
        f"{cal['ece_heuristic']:.3f} for the uncalibrated confidence (which averages {mean_heuristic:.2f} while "
        f"{100 * cal['positives_rate']:.0f} % of the answers are right: "
        f"{'over' if mean_heuristic > cal['positives_rate'] else 'under'}-confident at this radius). With "
        f"{cal['n_samples']} photos that is a rough fit; thousands of photos give a tight one."
    )
    out["locate-calibrated"] = located = run.hafloc("hafloc locate queries/ --index lund.index --top-k 3")
    off = {r["image"]: metres(exif[Path(r["image"]).name], (r["lat"], r["lon"])) for r in parse_table(located)}
    within = sum(d <= cal["agree_m"] for d in off.values())
    out["locate-calibrated-truth"] = prose(
        f"({['Neither estimate was', 'One estimate was', 'Both estimates were'][within]} in fact within "
        f"{cal['agree_m']:g} m of where the photos were taken, by their own EXIF: "
        + ", ".join(f"{d:.1f} m for {Path(image).name}" for image, d in off.items())
        + ".)"
    )
    doc = run.json("hafloc locate queries/21.jpg --index lund.index --top-k 1 --min-confidence 0.6 --json")
    if doc["results"][0]["estimate"] is not None:
        raise RuntimeError("--min-confidence 0.6 no longer refuses 21.jpg: raise it on the page")
    out["min-confidence"] = fold_json(doc)

    # 7. the web API, on the tiny index of "Try it in seconds"
    run.hafloc(
        "hafloc model init --method haf --images photos/ --output tiny.model --clusters 8 --proj-dim 32 --max-side 128",
        cwd="tiny",
    )
    run.hafloc("hafloc index build photos/ --model tiny.model --index tiny.index --no-progress", cwd="tiny")
    out["serve-tiny"] = fold_json(serve_answer(run, "tiny"), abridge={"matches": 1})
    if screenshot:
        retake_screenshot(run.folder / "lund")
    return out, run.commands


def serve_answer(run: Run, cwd: str) -> dict:
    """What ``curl -F file=@query.jpg .../locate`` gets from ``hafloc serve --index tiny.index``."""
    import httpx

    sys.path.insert(0, str(ROOT / "tests"))
    from browser import hafloc_server

    run.commands.append("hafloc serve --index tiny.index")
    folder = run.folder / cwd
    with hafloc_server(folder / "tiny.index", backend=None, timeout=600) as url, open(folder / "query.jpg", "rb") as f:
        answer = httpx.post(url + "/locate", files={"file": ("query.jpg", f, "image/jpeg")}, timeout=600)
    answer.raise_for_status()
    return json.loads(run.normalise(answer.text))


def retake_screenshot(lund: Path) -> None:
    """docs/img/serve-page.jpg: the page after uploading queries/21.jpg to the calibrated index."""
    sys.path.insert(0, str(ROOT / "docs" / "img"))
    import make_screenshots

    shot = make_screenshots.serve_page(
        lund / "lund.index", lund / "queries" / "21.jpg", make_screenshots.OUT / "serve-page.jpg"
    )
    print("wrote", shot)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 with a diff when the page differs")
    ap.add_argument("--keep", type=Path, help="run in this (new) folder and keep it, instead of a temporary one")
    ap.add_argument("--screenshot", action="store_true", help="also retake docs/img/serve-page.jpg")
    args = ap.parse_args()
    images = shared_images()
    if not images.is_dir():
        raise SystemExit(f"no Lund photos at {images} (set HAFLOC_SHARED_DATA to the shared data folder)")
    with tempfile.TemporaryDirectory(prefix="hafloc-tutorial-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        outputs, commands = generate(images, folder, screenshot=args.screenshot)
    text = PAGE.read_text(encoding="utf-8")
    if unshown(text, commands):
        raise SystemExit(f"{PAGE.name} does not show the commands {unshown(text, commands)}")
    diff = page_diff(text, outputs)
    if args.check:
        print(diff or f"{PAGE.name} agrees with a real run", end="" if diff else "\n")
        return 1 if diff else 0
    if diff:
        write_text_atomic(PAGE, fill(text, outputs))
    print(f"{PAGE.name}: {'updated' if diff else 'unchanged'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
