"""The web server: upload a photo, get its estimated position, matches and attention maps.

``create_app`` loads the index and its model once; inference runs in a small thread pool so the
event loop keeps answering (``/health``, thumbnails) while a photo is described. Uploads are
capped by Content-Length *and* while the body streams in (a client may lie or send chunked),
decoded with ``load_image`` (never trusted by their content type), and thumbnails are served
only for images of the index, looked up by database id and checked to lie inside their root.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import secrets
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile

from ..errors import HaflocError, InputError
from ..images.io import ImageTooLarge, load_image
from ..index.locator import Locator, LocatorConfig
from ..index.prior import Near

STATIC = Path(__file__).parent / "static"
# /thumbnails/ID?size=...: the longest side of each size (never upscaled). "large" is the correspondence
# panel's database photo, drawn up to 360 CSS px tall (style.css #verify): sharp on a 2x screen
THUMB_SIDES = {"small": 256, "large": 1024}
OVERLAY_SIDE = 320
MAX_PLOT_POINTS = 20_000  # the page's map; more points only slow the browser down
MAX_CORRESPONDENCES = 300  # inlier pairs sent for the best match (as many as the page draws)


@dataclass
class ServeConfig:
    max_upload_mb: float = 20.0
    token: str | None = None
    top_k: int = 10
    inference_threads: int = 1  # photos described at once per process; each already uses --threads cores
    thumb_cache_mb: float = 64.0  # JPEG bytes of thumbnails kept per process (a large one: ~100-200 kB)
    tiles: str | None = None  # map tile URL template ({z}/{x}/{y}); None: a plain coordinate grid, offline
    tiles_attribution: str | None = None
    # decoded pixels an upload may have: a small PNG can hold 100+ MP (~1 GB decoded, seconds of CPU)
    max_pixels: int = 40_000_000


def check_tile_url(url: str) -> str:
    """A tile URL template for the page's map: http(s) with {z}, {x} and {y} (HaflocError otherwise)."""
    if not url.startswith(("http://", "https://")) or any(f"{{{c}}}" not in url for c in "zxy"):
        raise HaflocError(
            f"--tiles {url!r}: expected an http(s) URL template with {{z}}, {{x}} and {{y}}, "
            "e.g. https://tile.openstreetmap.org/{z}/{x}/{y}.png"
        )
    return url


class _AsciiJSON(JSONResponse):
    """JSON with non-ASCII escaped: an indexed name that is not UTF-8 (surrogate-escaped) stays lossless."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


class _TooLarge(Exception):
    pass


# An over-size upload is read and discarded up to this many times the cap, for at most this long,
# before the 413 goes out (see UploadLimit._drain); beyond that the connection is simply closed.
DRAIN_FACTOR = 2
DRAIN_SECONDS = 10.0


class UploadLimit:
    """ASGI middleware: 413 for request bodies over ``max_bytes``, by header and while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit_mb = self.max_bytes / 2**20
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    return await _send_json(send, 400, "malformed Content-Length header")
                if too_big:
                    if (b"expect", b"100-continue") not in scope["headers"]:  # else no body was sent
                        await self._drain(receive, 0)
                    return await _send_json(send, 413, f"upload larger than the {limit_mb:g} MB limit")
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge()
            return msg

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._drain(receive, received)
                await _send_json(send, 413, f"upload larger than the {limit_mb:g} MB limit")

    async def _drain(self, receive, received: int) -> None:
        """Read and discard the rest of an over-size body (up to ``DRAIN_FACTOR`` x the cap, for at most
        ``DRAIN_SECONDS``) before answering 413: closing a socket with unread data makes the kernel reset
        the connection, and the client then sees "connection reset" instead of the 413 and its message."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_SECONDS
        while received <= DRAIN_FACTOR * self.max_bytes:
            try:
                msg = await asyncio.wait_for(receive(), timeout=max(0.01, deadline - loop.time()))
            except asyncio.TimeoutError:
                return
            if msg["type"] != "http.request":
                return
            received += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                return


async def _send_json(send, status: int, message: str) -> None:
    resp = JSONResponse({"detail": message}, status_code=status, headers={"Connection": "close"})
    await send({"type": "http.response.start", "status": status, "headers": resp.raw_headers})
    await send({"type": "http.response.body", "body": resp.body})


def _jet(x: np.ndarray) -> np.ndarray:
    """Matplotlib's 'jet' colour map (piecewise linear) for x in [0, 1] -> uint8 RGB."""
    rgb = np.stack([np.clip(1.5 - np.abs(4 * x - c), 0, 1) for c in (3, 2, 1)], axis=-1)
    return (rgb * 255).astype(np.uint8)


def overlay_png(img: Image.Image, att: np.ndarray, side: int = OVERLAY_SIDE, alpha: float = 0.5) -> str:
    """``img`` with ``att`` (h, w) min-max normalised, upsampled and blended as a heat map: a data URL."""
    base = img.copy()
    base.thumbnail((side, side), Image.Resampling.BILINEAR)
    a = np.asarray(att, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    if not hi - lo > 1e-6 * max(1.0, abs(hi)):  # uniform (e.g. untrained attention): nothing to highlight
        return _png_data_url(base.convert("RGB"))
    a = (a - lo) / (hi - lo)
    heat = Image.fromarray((a * 255).astype(np.uint8)).resize(base.size, Image.Resampling.BILINEAR)
    colour = Image.fromarray(_jet(np.asarray(heat, dtype=np.float32) / 255.0))
    return _png_data_url(Image.blend(base.convert("RGB"), colour, alpha))


def _png_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def attention_json(img: Image.Image, att: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per level: map shape, value range, whether it is uniform, and the overlay as a PNG data URL."""
    out = {}
    for lv, a in att.items():
        a = np.asarray(a, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        out[lv] = {
            "shape": list(a.shape),
            "min": round(lo, 6),
            "max": round(hi, 6),
            "uniform": not hi - lo > 1e-6 * max(1.0, abs(hi)),
            "overlay": overlay_png(img, a),
        }
    return out


def server_document(index_name: str, result: dict[str, Any]) -> dict[str, Any]:
    """The ``hafloc locate --json`` document of one upload (docs/locate.schema.json), without server
    paths: each match loses ``root``, the best match's correspondences are thinned to
    ``MAX_CORRESPONDENCES`` evenly spaced pairs (its ``inliers`` still counts them all)."""
    for m in result["matches"]:
        m.pop("root", None)
        corr = m.get("correspondences")
        if corr and len(corr["query"]) > MAX_CORRESPONDENCES:
            keep = np.linspace(0, len(corr["query"]) - 1, MAX_CORRESPONDENCES).astype(int)
            corr["query"] = [corr["query"][i] for i in keep]
            corr["db"] = [corr["db"][i] for i in keep]
    return {"index": index_name, "results": [result], "failures": []}


# JPEGs above DRAFT_MIN_PIXELS are decoded at a DCT scale keeping this many times the model's
# input side: the later resize (reducing_gap 3) still averages real pixels
DRAFT_FACTOR = 4


def _near_fields(near: Any, within: Any) -> Near | None:
    """``POST /locate``'s optional position prior: fields near=LAT,LON and within=M (metres)."""
    try:
        metres = float(str(within)) if within not in (None, "") else None
    except ValueError:
        raise HTTPException(422, f"within: expected metres, got {str(within)!r}") from None
    try:
        return Near.parse(str(near) if near else None, metres)
    except HaflocError as err:
        raise HTTPException(422, str(err).replace("--", "")) from None


def decode_upload(
    data: bytes, filename: str, max_side: int | None = None, max_pixels: int = ServeConfig.max_pixels
) -> Image.Image:
    """Bytes of an upload -> RGB image via ``load_image``, in memory (a killed worker leaves no
    file behind): InputError naming ``filename``; ImageTooLarge above ``max_pixels``, read from the
    header before decoding."""
    return load_image(
        data, max_side=max_side * DRAFT_FACTOR if max_side else None, max_pixels=max_pixels, name=filename
    )


class _ThumbCache:
    """LRU of thumbnail JPEG bytes by (database id, size), bounded in bytes (sizes differ 10-fold)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self._lock = max_bytes, threading.Lock()
        self._d: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._bytes = 0

    def get(self, key: tuple[int, str]) -> bytes | None:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        return None

    def put(self, key: tuple[int, str], value: bytes) -> None:
        with self._lock:
            self._bytes += len(value) - len(self._d.pop(key, b""))
            self._d[key] = value
            while self._bytes > self.max_bytes and self._d:
                self._bytes -= len(self._d.popitem(last=False)[1])


def create_app(
    index_path: str | Path,
    max_upload_mb: float = 20,
    token: str | None = None,
    backend: str = "auto",
    model_path: str | Path | None = None,
    top_k: int = 10,
    locator_config: LocatorConfig | None = None,
    inference_threads: int = 1,
    tiles: str | None = None,
    tiles_attribution: str | None = None,
    max_pixels: int = ServeConfig.max_pixels,
) -> FastAPI:
    """The FastAPI app over one index; the model is loaded here, once (per process).

    The index is opened read-only: the server never takes its write lock, so ``hafloc index add``
    runs beside it; new images are answered once that writer has saved its search structure.

    ``tiles``: a tile URL template the page's map draws under the positions (the browser fetches
    them, not the server); default none: a coordinate grid, so the page works offline.
    """
    config = ServeConfig(
        max_upload_mb=max_upload_mb,
        token=token or None,
        top_k=top_k,
        inference_threads=inference_threads,
        tiles=check_tile_url(tiles) if tiles else None,
        tiles_attribution=tiles_attribution,
        max_pixels=int(max_pixels),
    )
    if config.tiles and not config.tiles_attribution:  # tile servers ask for credit: at least name the source
        config.tiles_attribution = "tiles: " + (urlsplit(config.tiles).hostname or config.tiles).removeprefix("{s}.")
    lc = locator_config or LocatorConfig(backend=backend)
    locator = Locator(index_path, model_path, lc, read_only=True)
    pool = ThreadPoolExecutor(max_workers=max(1, config.inference_threads), thread_name_prefix="hafloc-infer")
    thumbs = _ThumbCache(int(config.thumb_cache_mb * 2**20))

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        pool.shutdown(wait=True)
        locator.close()

    app = FastAPI(
        title="hafloc",
        description="Where was this photo taken?",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.locator = locator
    app.state.config = config

    def authorised(request: Request) -> None:
        if config.token is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip().encode(), config.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def in_pool(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict[str, Any]:
        # pid: which process answered (``serve --workers N`` runs N behind one port)
        return {
            "status": "ok",
            "pid": os.getpid(),
            "images": locator.store.image_count(),
            "token_required": config.token is not None,
            "max_upload_mb": config.max_upload_mb,
            "max_pixels": config.max_pixels,
            "top_k": config.top_k,
            "calibrated": locator.calibrator is not None,
            "radius_m": locator.agree_m,
            "map": {"tiles": config.tiles, "attribution": config.tiles_attribution, "radius_m": locator.agree_m},
        }

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/positions", dependencies=[Depends(authorised)])
    async def positions() -> dict[str, Any]:
        rows = await in_pool(locator.store.images)
        pts = [{"id": r["id"], "lat": r["lat"], "lon": r["lon"]} for r in rows if r["lat"] is not None]
        shown = pts
        if len(pts) > MAX_PLOT_POINTS:  # an even subsample keeps the shape of the database
            shown = [pts[i] for i in np.linspace(0, len(pts) - 1, MAX_PLOT_POINTS).astype(int)]
        return {"total": len(rows), "positioned": len(pts), "points": shown}

    def make_thumb(image_id: int, side: int) -> bytes:
        row = locator.store.image(image_id)  # by id, never by a path
        if row is None:
            raise HTTPException(404, "no such image in the index")
        root = Path(row["root"]).resolve()
        path = (root / row["image"]).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise HTTPException(404, "image file not available")
        try:
            img = load_image(path, max_side=side * DRAFT_FACTOR)
        except InputError:
            raise HTTPException(404, "image file not readable") from None
        img.thumbnail((side, side), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return buf.getvalue()

    @app.get("/thumbnails/{image_id}", dependencies=[Depends(authorised)])
    async def thumbnail(image_id: str, size: str = "small") -> Response:
        """An indexed photo as a JPEG whose longest side is at most ``THUMB_SIDES[size]``."""
        # ids only: anything else (paths, '..', encoded tricks) is refused before any file access
        if not image_id.isdecimal() or len(image_id) > 18:
            raise HTTPException(404, "thumbnails are addressed by database id")
        if size not in THUMB_SIDES:
            raise HTTPException(422, f"size: expected one of {', '.join(THUMB_SIDES)}, got {size[:40]!r}")
        key = (int(image_id), size)
        data = thumbs.get(key)
        if data is None:
            data = await in_pool(make_thumb, key[0], THUMB_SIDES[size])
            thumbs.put(key, data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    index_name = Path(index_path).resolve().name

    def locate_bytes(data: bytes, filename: str, with_attention: bool, near: Near | None = None) -> dict[str, Any]:
        img = decode_upload(data, filename, locator.extractor.max_side, config.max_pixels)
        result, att = locator.locate_image(img, filename, k=config.top_k, correspondences=True, near=near)
        if with_attention:
            result["attention"] = attention_json(img, att)
        return server_document(index_name, result)

    @app.post("/locate", dependencies=[Depends(authorised)])
    async def locate(request: Request, attention: bool = False) -> JSONResponse:
        """``hafloc locate --json``'s document for one photo; ``?attention=1`` adds the overlays."""
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise HTTPException(415, "send the photo as multipart/form-data in the field 'file'")
        async with request.form(max_files=1, max_fields=4) as form:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise HTTPException(422, "no file in the multipart field 'file'")
            data = await upload.read()
            filename = Path(upload.filename or "upload").name or "upload"
            near = _near_fields(form.get("near"), form.get("within"))
        if not data:
            raise HTTPException(400, f"{filename}: empty file")
        try:
            result = await in_pool(locate_bytes, data, filename, attention, near)
        except ImageTooLarge as err:
            raise HTTPException(413, str(err)) from None
        except InputError as err:
            status = 415 if "not an image" in err.cause else 422
            raise HTTPException(status, str(err)) from None
        return _AsciiJSON(result)

    # outermost user middleware: it must see the raw body stream before anything parses it
    app.add_middleware(UploadLimit, max_bytes=int(config.max_upload_mb * 2**20))
    return app
