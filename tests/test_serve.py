"""The web server: /locate on real photos, hostile uploads and paths, tokens, a real uvicorn + Chromium."""

from __future__ import annotations

import base64
import fnmatch
import io
import shutil
import socket
import sqlite3
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from hafloc.cli import main
from hafloc.datasets.geo import haversine_m
from test_cli_index import make_photo_db, make_small_model

REPO = Path(__file__).resolve().parents[1]
CAP_MB = 1


@pytest.fixture(scope="module")
def served(tmp_path_factory, shared_data) -> dict:
    root = tmp_path_factory.mktemp("serve")
    data = make_photo_db(shared_data / "landmarks_mini" / "images", root)
    data["model"] = make_small_model(sorted(data["db"].glob("*.jpg")), root / "small.model")
    data["index"] = root / "index"
    assert (
        main(
            [
                "index",
                "build",
                str(data["db"]),
                "--model",
                str(data["model"]),
                "--index",
                str(data["index"]),
                "--positions",
                str(data["csv"]),
                "--backend",
                "torch",
                "--no-progress",
            ]
        )
        == 0
    )
    return data


@pytest.fixture(scope="module")
def client(served):
    from hafloc.serve.app import create_app

    with TestClient(create_app(served["index"], max_upload_mb=CAP_MB, backend="torch")) as c:
        yield c


def _photo(served, i: int = 0) -> tuple[str, bytes]:
    name = next(n for n in served["names"] if n in served["positions"]) if i == 0 else served["names"][i]
    return name, (served["db"] / name).read_bytes()


def _decode_data_url(url: str) -> Image.Image:
    head, b64 = url.split(",", 1)
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_locate_real_photo(client, served):
    name, data = _photo(served)
    r = client.post("/locate?attention=1", files={"file": (name, data, "image/jpeg")})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    lat, lon = served["positions"][name]
    assert res["image"] == name
    assert haversine_m(res["estimate"]["lat"], res["estimate"]["lon"], lat, lon) < 1.0
    assert res["matches"][0]["image"] == name and res["matches"][0]["similarity"] > 0.999
    assert len(res["matches"]) == 10 and all(isinstance(m["id"], int) for m in res["matches"])
    assert set(res["attention"]) == {"low", "mid", "high"}
    sizes = [res["attention"][lv]["shape"] for lv in ("low", "mid", "high")]
    assert sizes[0][0] > sizes[1][0] > sizes[2][0]  # finer maps at lower levels
    with Image.open(served["db"] / name) as im:
        aspect = im.width / im.height
    for lv in ("low", "mid", "high"):
        a = res["attention"][lv]
        assert a["uniform"] == (a["max"] - a["min"] <= 1e-6 * max(1.0, abs(a["max"])))
        ov = _decode_data_url(a["overlay"])
        assert max(ov.size) <= 320 and abs(ov.width / ov.height - aspect) < 0.05
    # the match ids address the thumbnails of exactly those images
    top_id = res["matches"][0]["id"]
    t = client.get(f"/thumbnails/{top_id}")
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(t.content))
    with Image.open(served["db"] / name) as im:
        assert max(thumb.size) == 256 and abs(thumb.width / thumb.height - im.width / im.height) < 0.02
        # the correspondence panel's size: sharp where it is drawn, never upscaled, still a capped JPEG
        large = Image.open(io.BytesIO(client.get(f"/thumbnails/{top_id}?size=large").content))
        assert max(im.size) > 1024 and max(large.size) == 1024 and large.format == "JPEG"
        assert abs(large.width / large.height - im.width / im.height) < 0.02
    again = client.get(f"/thumbnails/{top_id}")  # each size cached apart
    assert again.content == t.content and max(Image.open(io.BytesIO(again.content)).size) == 256
    r = client.get(f"/thumbnails/{top_id}?size=2048")
    assert r.status_code == 422 and r.json()["detail"] == "size: expected one of small, large, got '2048'"


def test_attention_overlay_marks_where_attention_is_high(served):
    from hafloc.serve.app import overlay_png

    with Image.open(served["db"] / served["names"][0]) as im:
        img = im.convert("RGB")
    att = np.zeros((8, 8), np.float32)
    att[:, 4:] = 3.0  # right half attended
    ov = np.asarray(_decode_data_url(overlay_png(img, att)).convert("RGB"), dtype=np.float32)
    w = ov.shape[1]
    left, right = ov[:, : w // 4], ov[:, -w // 4 :]
    # jet: high -> red, low -> blue
    assert right[..., 0].mean() - right[..., 2].mean() > 40 and left[..., 2].mean() - left[..., 0].mean() > 40
    flat = np.asarray(_decode_data_url(overlay_png(img, np.ones((8, 8)))).convert("RGB"), dtype=np.float32)
    base = img.copy()
    base.thumbnail((320, 320), Image.BILINEAR)
    assert np.abs(flat - np.asarray(base, dtype=np.float32)).mean() < 1.0  # uniform map: the photo itself


def test_positions_and_page(client, served):
    pos = client.get("/api/positions").json()
    assert pos["total"] == len(served["names"]) and pos["positioned"] == len(served["positions"])
    got = sorted((p["lat"], p["lon"]) for p in pos["points"])
    np.testing.assert_allclose(got, sorted(served["positions"].values()), atol=1e-9)
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text
    # until the positions have loaded the map says so, never "no positioned photos"
    assert '<p id="map-message">loading&hellip;</p>' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    # offline: nothing is fetched from elsewhere
    assert "http://" not in page.text.replace("http://www.w3.org", "") and "https://" not in page.text


def test_map_assets_are_served_and_packaged(client):
    for asset in (
        "/static/map.js",
        "/static/map.css",
        "/static/vendor/leaflet/leaflet.js",
        "/static/vendor/leaflet/leaflet.css",
        "/static/vendor/leaflet/LICENSE",
    ):
        assert client.get(asset).status_code == 200, asset
    assert "BSD 2-Clause" in client.get("/static/vendor/leaflet/LICENSE").text
    assert client.get("/health").json()["map"] == {"tiles": None, "attribution": None, "radius_m": 25.0}
    # every static file ships in the wheel: some package-data glob covers it
    tomllib = pytest.importorskip("tomllib")
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["hafloc"]
    static = REPO / "hafloc" / "serve" / "static"
    files = [p.relative_to(REPO / "hafloc").as_posix() for p in static.rglob("*") if p.is_file()]
    assert "serve/static/vendor/leaflet/images/layers.png" in files
    # setuptools globs do not cross '/', unlike fnmatch: compare folder depth too
    uncovered = [f for f in files if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert uncovered == []


def test_tiles_option(served, capsys):
    from hafloc.errors import HaflocError
    from hafloc.serve.app import create_app

    osm = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
    with TestClient(create_app(served["index"], backend="torch", tiles=osm)) as c:
        assert c.get("/health").json()["map"]["tiles"] == osm
        assert c.get("/health").json()["map"]["attribution"] == "tiles: tile.openstreetmap.org"
    for bad in ("tile.openstreetmap.org/{z}/{x}/{y}.png", "https://example.org/tiles.png", "file:///{z}/{x}/{y}"):
        with pytest.raises(HaflocError, match="--tiles"):
            create_app(served["index"], backend="torch", tiles=bad)
    code = main(["serve", "--index", str(served["index"]), "--tiles", "ftp://x/{z}/{x}/{y}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("hafloc: error: --tiles 'ftp://x/{z}/{x}/{y}'")


def _chunks(n_bytes: int):
    for _ in range(n_bytes // 65536 + 1):
        yield b"\xff" * 65536


@pytest.mark.parametrize(
    "case, status",
    [
        ("empty", 400),
        ("text", 415),
        ("truncated", 422),
        ("too_big", 413),
        ("too_big_chunked", 413),
        ("no_file_field", 422),
        ("not_multipart", 415),
        ("bad_multipart", 400),
    ],
)
def test_bad_uploads_are_refused_and_server_keeps_serving(client, served, case, status):
    name, data = _photo(served)
    if case == "empty":
        r = client.post("/locate", files={"file": ("empty.jpg", b"", "image/jpeg")})
    elif case == "text":
        r = client.post("/locate", files={"file": ("notes.jpg", b"just some text\n" * 20, "image/jpeg")})
    elif case == "truncated":
        r = client.post("/locate", files={"file": ("cut.jpg", data[: len(data) // 2], "image/jpeg")})
    elif case == "too_big":
        r = client.post("/locate", files={"file": ("big.jpg", b"\xff" * (CAP_MB * 2**20 + 10), "image/jpeg")})
    elif case == "too_big_chunked":  # no Content-Length: the cap must hold while the body streams in
        r = client.post(
            "/locate",
            content=_chunks(CAP_MB * 2**20 * 2),
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        )
        assert "content-length" not in r.request.headers
    elif case == "no_file_field":
        r = client.post("/locate", files={"photo": (name, data, "image/jpeg")})
    elif case == "not_multipart":
        r = client.post("/locate", content=data, headers={"content-type": "image/jpeg"})
    else:
        r = client.post(
            "/locate", content=b"garbage without boundaries", headers={"content-type": "multipart/form-data"}
        )
    assert r.status_code == status, r.text
    assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    if case in ("empty", "text", "truncated"):
        assert r.json()["detail"].startswith({"empty": "empty.jpg", "text": "notes.jpg", "truncated": "cut.jpg"}[case])
    assert client.get("/health").json()["status"] == "ok"
    assert client.post("/locate", files={"file": (name, data, "image/jpeg")}).status_code == 200


@pytest.mark.parametrize(
    "url",
    [
        "/thumbnails/..%2F..%2Fetc%2Fpasswd",
        "/thumbnails/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/thumbnails/%2Fetc%2Fpasswd",
        "/thumbnails/%2e%2e",
        "/thumbnails/1%2F..%2F..%2Fsmall.model",
        "/thumbnails/-1",
        "/thumbnails/999999",
        "/thumbnails/1e3",
        "/thumbnails/%31%00",
        "/static/..%2F..%2Fcli%2F__init__.py",
        "/static/%2e%2e/app.py",
    ],
)
def test_path_traversal_is_refused(client, url):
    r = client.get(url)
    assert 400 <= r.status_code < 500, (url, r.status_code)
    assert not r.headers["content-type"].startswith("image/") and b"import" not in r.content
    assert client.get("/health").status_code == 200


def test_thumbnail_row_pointing_outside_its_root_is_refused(served, tmp_path):
    from hafloc.serve.app import create_app

    idx = tmp_path / "index"
    shutil.copytree(served["index"], idx)
    secret = served["db"].parent / "small.model"  # a real file beside the indexed root
    with sqlite3.connect(idx / "meta.sqlite") as db:  # a damaged or hostile database row
        db.execute("UPDATE images SET path = ? WHERE id = 2", ("../small.model",))
        db.execute("UPDATE images SET path = ? WHERE id = 3", (str(secret),))
    with TestClient(create_app(idx, backend="torch")) as c:
        assert c.get("/thumbnails/1").status_code == 200
        for i in (2, 3):
            r = c.get(f"/thumbnails/{i}")
            assert r.status_code == 404 and r.headers["content-type"] == "application/json"


def test_bearer_token(served):
    from hafloc.serve.app import create_app

    name, data = _photo(served)
    with TestClient(create_app(served["index"], token="s3cret", backend="torch")) as c:
        assert c.get("/health").json()["token_required"] is True
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            assert c.post("/locate", files={"file": (name, data)}, headers=headers).status_code == 401
            assert c.get("/thumbnails/1", headers=headers).status_code == 401
            assert c.get("/api/positions", headers=headers).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/locate", files={"file": (name, data)}, headers=ok).status_code == 200
        assert c.get("/thumbnails/1", headers=ok).status_code == 200
        assert c.get("/api/positions", headers=ok).status_code == 200


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_busy_port_is_one_line_before_anything_serves(served, capsys, workers):
    serve = ["serve", "--index", str(served["index"]), "--backend", "torch", "--workers", workers]
    with socket.socket() as other:  # another server on the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        code = main([*serve, "--port", str(port)])
    out, err = capsys.readouterr()
    assert code == 2 and "serving" not in out, out
    assert err.splitlines() == [
        f"hafloc: error: cannot listen on 127.0.0.1:{port}: the port is already in use (choose another --port)"
    ]
    assert main([*serve, "--port", "70000"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "hafloc: error: cannot listen on 127.0.0.1:70000: bind(): port must be 0-65535."
    ]


def _serve(index: Path, *extra: str, port: int | None = None):
    """``hafloc serve`` as a real process on a free loopback port (the shared harness): yields its URL."""
    try:
        from browser import hafloc_server
    except ImportError:  # run from the repo root as a package
        from tests.browser import hafloc_server
    return hafloc_server(index, *extra, port=port)


@pytest.fixture(scope="module")
def live_server(served):
    with _serve(served["index"]) as url:
        yield url


def test_real_server_locates_and_survives_bad_uploads(live_server, served):
    name, data = _photo(served)
    with httpx.Client(base_url=live_server, timeout=60) as c:
        assert c.post("/locate", files={"file": ("x.txt", b"hello")}).status_code == 415
        r = c.post("/locate", files={"file": (name, data, "image/jpeg")})
        assert r.status_code == 200 and r.json()["results"][0]["matches"][0]["image"] == name
        assert c.get("/thumbnails/%2e%2e%2f%2e%2e%2fetc%2fpasswd").status_code == 404
        assert c.get("/health").status_code == 200


def _browser():
    try:
        import browser
    except ImportError:  # run from the repo root as a package
        from tests import browser
    reason = browser.browser_available()
    if reason:
        pytest.skip(reason)
    return browser


def _centre(page, selector: str) -> tuple[float, float]:
    box = page.locator(selector).first.bounding_box()
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2


def _offsite(requests: list[str], base: str) -> list[str]:
    """Requests that left the server under test (data: and blob: URLs stay in the page)."""
    return [u for u in requests if not u.startswith((base + "/", "data:", "blob:"))]


@pytest.mark.browser
def test_browser_upload_shows_estimate_and_thumbnails(live_server, served, tmp_path):
    browser = _browser()
    images_loaded, open_page, screenshot = browser.images_loaded, browser.open_page, browser.screenshot
    name, _ = _photo(served)
    requests: list[str] = []
    with open_page(live_server + "/", requests=requests) as (page, console_errors, failed_requests):
        # while the positions load the map says "loading…" (held here until checked)
        held: list = []
        page.route("**/api/positions", lambda route: held.append(route))
        page.reload()
        # the first load's requests still in flight (its /health poll) were aborted by the reload
        failed_requests[:] = [f for f in failed_requests if "net::ERR_ABORTED" not in f]
        page.wait_for_function("() => document.querySelector('.leaflet-container') !== null")
        assert page.locator("#map-message").inner_text() == "loading\u2026"
        while not held:
            page.wait_for_timeout(50)
        held[0].continue_()
        page.wait_for_function("document.querySelectorAll('#map path.hafloc-db').length > 0")
        assert page.locator("#map path.hafloc-db").count() == len(served["positions"])
        assert page.locator("#map .hafloc-grid").count() > 0 and page.locator("#map img.leaflet-tile").count() == 0
        assert page.locator("#map-message").is_hidden()
        with page.expect_response("**/locate?attention=1") as resp:
            page.set_input_files("#file", str(served["db"] / name))
        res = resp.value.json()["results"][0]
        page.wait_for_selector("#map-estimate", state="attached")
        page.wait_for_function("document.querySelectorAll('#matches li img').length === 10")
        # the map: one numbered marker per positioned match, rank 1 on the estimate, the radius circle around it
        ranks = [str(i) for i, m in enumerate(res["matches"], 1) if m["lat"] is not None]
        assert len(ranks) >= 8  # matches without a position are listed below the map, not drawn
        markers = page.locator("#map .leaflet-marker-icon.hafloc-match")
        assert markers.count() == len(ranks) and markers.all_inner_texts() == ranks
        assert page.locator("#map path.hafloc-radius").count() == 1
        ex, ey = _centre(page, "#map-estimate")
        mx, my = _centre(page, "#map .hafloc-match >> text='1'")
        rx, ry = _centre(page, "#map path.hafloc-radius")
        assert abs(ex - mx) < 2 and abs(ey - my) < 2 and abs(ex - rx) < 2 and abs(ey - ry) < 2
        page.locator("#map .hafloc-match >> text='1'").click()  # its popup: thumbnail, name, similarity
        popup = page.locator(".leaflet-popup .hafloc-popup")
        popup.wait_for()
        assert name in popup.inner_text() and "similarity 1.000" in popup.inner_text()
        page.wait_for_function("document.querySelector('.hafloc-popup img').naturalWidth > 0")
        assert images_loaded(page) == []
        lat, lon = served["positions"][name]
        assert page.locator("#estimate").inner_text() == f"{lat:.6f}, {lon:.6f}"
        assert page.locator("#matches li").first.inner_text().count(name) == 1
        assert page.locator("#attention img").count() == 3
        # query preview + 3 overlays + 10 thumbnails + the popup's one, all decoded
        assert page.evaluate("Array.from(document.images).filter(i => i.naturalWidth > 0).length") == 15
        screenshot(page, tmp_path / "serve.png")
        # a bad upload shows a message, the page stays usable
        bad = tmp_path / "bad.jpg"
        bad.write_text("not a photo")
        page.set_input_files("#file", str(bad))
        page.wait_for_selector("#error:not([hidden])")
        assert "not an image" in page.locator("#error").inner_text()
    assert [e for e in console_errors if "415" not in e] == []
    assert [f for f in failed_requests if not f.startswith("415 ")] == []
    assert requests and _offsite(requests, live_server) == []


@pytest.fixture(scope="module")
def unpositioned_index(served) -> Path:
    """The same photos indexed without positions: every answer is "no estimate"."""
    index = served["db"].parent / "index-unpositioned"
    assert (
        main(
            [
                "index",
                "build",
                str(served["db"]),
                "--model",
                str(served["model"]),
                "--index",
                str(index),
                "--backend",
                "torch",
                "--no-progress",
            ]
        )
        == 0
    )
    return index


@pytest.mark.browser
def test_browser_map_unknown_estimate_and_tiles(served, unpositioned_index, tmp_path):
    browser = _browser()
    name, _ = _photo(served)
    port = browser.free_port()
    base = f"http://127.0.0.1:{port}"
    # a tile server the test controls: this server's own static PNG, one per {z}/{x}/{y}
    tiles = base + "/static/vendor/leaflet/images/marker-icon.png?z={z}&x={x}&y={y}"
    requests: list[str] = []
    with (
        _serve(unpositioned_index, "--tiles", tiles, "--tiles-attribution", "<b>test</b> tiles", port=port),
        browser.open_page(base + "/", requests=requests) as (page, console_errors, failed_requests),
    ):
        page.wait_for_function("document.querySelectorAll('#map img.leaflet-tile-loaded').length > 0")
        assert page.locator("#map .leaflet-control-attribution").inner_text() == "<b>test</b> tiles"  # text, not HTML
        assert page.locator("#map .hafloc-grid").count() == 0  # tiles replace the grid
        # once the (empty) positions have loaded: never "loading…" again
        page.wait_for_function("document.getElementById('map-message').textContent !== 'loading\u2026'")
        assert page.locator("#map-message").inner_text() == "no positioned photos in the index"
        page.set_input_files("#file", str(served["db"] / name))
        page.wait_for_function("document.querySelectorAll('#matches li').length === 10")
        message = page.locator("#map-message")
        assert message.is_visible() and message.inner_text() == "no estimate: no match has a position"
        assert page.locator("#map-estimate").count() == 0 and page.locator("#map .hafloc-match").count() == 0
        assert page.locator("#map path.hafloc-radius").count() == 0
        # an "unknown" answer whose matches do have positions (a refused low confidence): its reason, and the
        # matches still drawn
        matches = [
            {
                "id": 1,
                "image": f"m{i}.jpg",
                "lat": 51.5 + 0.001 * i,
                "lon": -0.1,
                "similarity": 0.5 - 0.01 * i,
                "distance_m": None,
            }
            for i in range(3)
        ]
        page.evaluate(
            "(r) => haflocMap.showResult(r)",
            {
                "image": "q.jpg",
                "estimate": None,
                "matches": matches,
                "unknown": {"reason": "confidence 0.12 below 0.5", "confidence": 0.12},
            },
        )
        assert message.inner_text() == "no estimate: confidence 0.12 below 0.5"
        assert page.locator("#map .hafloc-match").all_inner_texts() == ["1", "2", "3"]
        browser.screenshot(page, tmp_path / "unknown.png")
    assert console_errors == [] and failed_requests == []
    assert _offsite(requests, base) == []
    assert any("/static/vendor/leaflet/images/marker-icon.png?z=" in u for u in requests)


def test_locate_with_a_position_prior(client, served):
    name, data = _photo(served)
    center = served["positions"][served["names"][4]]  # another landmark's photo
    form = {"near": f"{center[0]},{center[1]}", "within": "300"}
    r = client.post("/locate", files={"file": (name, data, "image/jpeg")}, data=form)
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]  # the locate --json document
    assert res["near"]["within_m"] == 300.0 and res["matches"]
    assert all(haversine_m(*center, m["lat"], m["lon"]) <= 300 for m in res["matches"])
    assert name not in {m["image"] for m in res["matches"]}  # the photo itself lies elsewhere
    bad_forms = [{"near": "north", "within": "300"}, {"near": "1,2"}, {"near": "1,2", "within": "-5"}]
    for bad in [*bad_forms, {"near": "1,2", "within": "far"}]:
        r = client.post("/locate", files={"file": (name, data, "image/jpeg")}, data=bad)
        assert r.status_code == 422 and r.json()["detail"].startswith(("near", "within")), r.text
