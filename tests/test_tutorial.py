"""docs/tutorial-own-photos.md shows what its commands print: a real run must write the same page.

Runs scripts/gen_tutorial.py's run of the tutorial (untrained model, 16 clusters, 480-pixel images,
27 Lund photos; a few minutes on 2 cores) once for the module.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_gen_tutorial():
    spec = importlib.util.spec_from_file_location("gen_tutorial", REPO / "scripts" / "gen_tutorial.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _load_gen_tutorial()


@pytest.fixture(scope="module")
def real_run(shared_data, tmp_path_factory) -> tuple[dict[str, str], list[str]]:
    """(outputs by marker name, the commands run) of one real run of the tutorial."""
    return gen.generate(shared_data / "lund_gps" / "images", tmp_path_factory.mktemp("tutorial"))


@pytest.mark.slow
def test_every_output_on_the_page_is_a_real_run(real_run):
    """Each marked block equals what its command printed; a drift names the script that fixes it."""
    outputs, _ = real_run
    diff = gen.page_diff(gen.PAGE.read_text(encoding="utf-8"), outputs)
    assert not diff, (
        f"{gen.PAGE.name} differs from a real run of its commands: run `python scripts/gen_tutorial.py`, "
        f"then re-read the prose around each changed block.\n{diff}"
    )


@pytest.mark.slow
def test_the_page_shows_every_command_run(real_run):
    """What the script runs is what the page tells the reader to type."""
    _, commands = real_run
    assert len(commands) >= 15
    assert gen.unshown(gen.PAGE.read_text(encoding="utf-8"), commands) == []


def test_markers_fill_fences_and_paragraphs():
    """A marker fills the inside of the fence after it, or the paragraph after it; one without an
    output, or an output without a marker, is an error."""
    page = "# T\n\n<!-- output: a -->\n```text\nold\n```\n\n<!-- output: b -->\nold prose\nstill old\n\nkept\n"
    new = gen.fill(page, {"a": "new 1\nnew 2\n", "b": "new prose"})
    assert new == "# T\n\n<!-- output: a -->\n```text\nnew 1\nnew 2\n```\n\n<!-- output: b -->\nnew prose\n\nkept\n"
    assert gen.page_diff(new, {"a": "new 1\nnew 2", "b": "new prose"}) == ""
    with pytest.raises(ValueError, match=r"markers without an output \['b'\]"):
        gen.fill(page, {"a": "x"})
    with pytest.raises(ValueError, match="must be followed by a fence or a paragraph"):
        gen.marked_blocks("<!-- output: c -->\n\ntext\n")


def test_progress_bars_are_left_out():
    """tqdm's frames (after carriage returns) go; what was printed between them stays."""
    raw = (
        "INFO exporting\rfit:   0%|          | 0/27 [00:00<?, ?img/s]\rfit: 100%|##########| 27/27 "
        "[00:03<00:00,  7.69img/s]\nwrote haf.model (5.4 s)\n\rindexing: 3img [00:01, 2.9img/s]\n"
    )
    assert gen.strip_progress(raw) == "INFO exporting\nwrote haf.model (5.4 s)\n"
