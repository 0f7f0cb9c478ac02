"""Screenshots for the docs, taken by headless Debian Chromium (never by hand).

    python docs/img/make_screenshots.py --index lund.index --photo queries/21.jpg [--demo hafloc-demo]

Starts `hafloc serve --index INDEX` on a free loopback port, uploads PHOTO through the page's file
input, waits for the answer (estimate, verified correspondences, map, matches) and writes
docs/img/serve-page.jpg (JPEG: photos); with --demo, also docs/img/demo-report.jpg from the demo's index.html.
Uses the test harness tests/browser.py (Chromium at /usr/bin/chromium through playwright).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from browser import browser_available, hafloc_server, open_page, screenshot  # noqa: E402

OUT = Path(__file__).resolve().parent


def serve_page(index: Path, photo: Path, out: Path) -> Path:
    with (
        hafloc_server(index, timeout=120) as url,
        open_page(url, viewport=(1280, 900), timeout_ms=120000) as (page, errors, failed),
    ):
        page.wait_for_selector("#status")
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("#result:not([hidden])", timeout=120000)
        page.wait_for_function("document.querySelectorAll('#matches li img').length > 0", timeout=120000)
        time.sleep(1.0)  # let the map's fit animation settle
        shot = screenshot(page, out)
    if errors or failed:
        print(f"warning: console errors {errors}, failed requests {failed}", file=sys.stderr)
    return shot


def demo_report(demo: Path, out: Path) -> Path:
    with open_page(demo / "index.html", viewport=(1280, 1400)) as (page, _errors, _failed):
        return screenshot(page, out, full_page=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--photo", type=Path, required=True)
    ap.add_argument("--demo", type=Path, help="a hafloc demo output folder")
    args = ap.parse_args()
    reason = browser_available()
    if reason:
        raise SystemExit(reason)
    print("wrote", serve_page(args.index, args.photo, OUT / "serve-page.jpg"))
    if args.demo:
        print("wrote", demo_report(args.demo, OUT / "demo-report.jpg"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
