"""Drawing one view of a place: a pinhole camera over facades, trees, the landmark and a car.

Every function draws into the view's buffers in a fixed order (later ones occlude earlier ones)
and draws from the view's random stream in that order: the same seed gives the same bytes.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from hafloc.synth.assets import Assets, resize
from hafloc.synth.config import CAMERA_HEIGHT_M
from hafloc.synth.scene import Camera, Place


def tile(tex: np.ndarray, px_per_tile: float, ox: float, oy: float, w: int, h: int) -> np.ndarray:
    """A (h, w) window of ``tex`` tiled at ``px_per_tile`` pixels per tile, starting at (ox, oy) px."""
    s = max(int(round(px_per_tile)), 2)
    t = resize(tex, s, s) if s != tex.shape[0] else tex
    ox, oy = int(ox) % s, int(oy) % s
    reps_y, reps_x = (h + oy) // s + 2, (w + ox) // s + 2
    big = np.tile(t, (reps_y, reps_x, 1))
    return big[oy : oy + h, ox : ox + w]


@dataclass
class View:
    """A camera's geometry in front of a place (x along the street, z depth, metres) and the
    buffers being drawn: ``img`` (H, W, 3) float RGB, ``emit`` (H, W) where a pixel emits its own
    light (sky, lit windows), ``spot`` (H, W) the floodlit landmark."""

    H: int
    W: int
    f: float  # focal length (px)
    cx: float
    yh: float  # horizon row
    x_c: float  # camera x
    z_l: float  # landmark depth
    z_f: float  # facade depth
    z_curb: float
    v_fb: int  # first row below the facades' base
    night: bool
    dusk: bool
    img: np.ndarray
    emit: np.ndarray
    spot: np.ndarray
    vv: np.ndarray  # (H, 1) row coordinates
    uu: np.ndarray  # (1, W) column coordinates

    @classmethod
    def of(cls, place: Place, cam: Camera, H: int, W: int) -> "View":
        f = W / (2 * math.tan(math.radians(cam.fov_deg) / 2))
        cx, yh = W / 2, cam.horizon * H
        z_l = f * place.landmark_w / (cam.fraction * W)  # landmark depth giving the wanted size
        z_f = z_l + place.gap
        x_c = -(cam.u_frac * W - cx) * z_l / f  # camera x so the landmark lands at u_frac
        view = cls(
            H=H,
            W=W,
            f=f,
            cx=cx,
            yh=yh,
            x_c=x_c,
            z_l=z_l,
            z_f=z_f,
            z_curb=max(z_l - 1.2, 0.5),
            v_fb=0,
            night=cam.condition == "night",
            dusk=cam.condition == "dusk",
            img=np.zeros((H, W, 3), np.float32),
            emit=np.zeros((H, W), np.float32),
            spot=np.zeros((H, W), np.float32),
            vv=np.arange(H, dtype=np.float32)[:, None],
            uu=np.arange(W, dtype=np.float32)[None, :],
        )
        view.v_fb = int(math.ceil(view.v_of(0, z_f)))
        return view

    def u_of(self, x: float, z: float) -> float:
        """Image column of a point at street position ``x`` and depth ``z``."""
        return self.cx + self.f * (x - self.x_c) / z

    def v_of(self, y: float, z: float) -> float:
        """Image row of a point ``y`` metres above the ground at depth ``z``."""
        return self.yh + self.f * (CAMERA_HEIGHT_M - y) / z


def render(place: Place, cam: Camera, assets: Assets, H: int, W: int, rng: np.random.Generator) -> np.ndarray:
    """One view as a float RGB (H, W, 3) image with its illumination applied."""
    view = View.of(place, cam, H, W)
    _sky(view, cam.condition)
    _ground(view, assets)
    _facades(view, place, assets, rng)
    _trees_and_lamps(view, place, assets)
    _landmark(view, place)
    _parked_car(view, rng)
    return illuminate(view.img, view.emit, view.spot, cam.condition, rng)


def _sky(view: View, condition: str) -> None:
    """Emissive, coloured per condition."""
    vv, yh, img, emit = view.vv, view.yh, view.img, view.emit
    t = np.clip(vv / max(yh, 1), 0, 1)[..., None]
    top, bottom = {
        "day": ((0.35, 0.55, 0.85), (0.75, 0.85, 0.95)),
        "dusk": ((0.25, 0.22, 0.45), (0.98, 0.60, 0.35)),
        "night": ((0.01, 0.02, 0.06), (0.06, 0.07, 0.12)),
    }[condition]
    img[:] = np.array(top, np.float32) * (1 - t) + np.array(bottom, np.float32) * t
    emit[:] = 1.0


def _ground(view: View, assets: Assets) -> None:
    """Sidewalk up to the curb in front of the landmark, road nearer the camera."""
    H, W, f, cx, yh, x_c, z_l, z_curb, v_fb = (
        view.H,
        view.W,
        view.f,
        view.cx,
        view.yh,
        view.x_c,
        view.z_l,
        view.z_curb,
        view.v_fb,
    )
    vv, uu, img, emit = view.vv, view.uu, view.img, view.emit
    gy = vv[:, 0] - yh
    z_row = np.where(gy > 0, f * CAMERA_HEIGHT_M / np.maximum(gy, 1e-3), np.inf)
    rows = np.arange(H)
    ground = rows >= max(v_fb, 0)
    if ground.any():
        side = tile(assets.sidewalk, f / z_l * 1.2, -x_c * f / z_l, 0, W, H)
        road = tile(assets.asphalt, f / max(z_curb, 1) * 2.0, -x_c * f / z_l, 0, W, H)
        is_road = (z_row < z_curb)[:, None]
        g = np.where(is_road[..., None], road, side)
        curb = (np.abs(z_row - z_curb) < 0.012 * z_curb + 0.06)[:, None]  # a light kerb stone line
        g = np.where(curb[..., None], 0.7, g)
        # dashed lane marking 3 m in front of the curb
        z_lane = z_curb - 3.5
        if z_lane > 0.8:
            lane_rows = np.abs(z_row - z_lane) < 0.04 * z_lane + 0.05
            x_lane = x_c + (uu - cx) * z_lane / f
            dash = np.mod(x_lane, 6.0) < 3.0
            g = np.where((lane_rows[:, None] & dash)[..., None], np.array([0.85, 0.8, 0.5], np.float32), g)
        img[ground] = g[ground]
        emit[ground] = 0


def _facades(view: View, place: Place, assets: Assets, rng: np.random.Generator) -> None:
    """The row of buildings behind the landmark, windows lit at random at dusk and night."""
    H, W, z_f, v_fb, night, dusk = view.H, view.W, view.z_f, view.v_fb, view.night, view.dusk
    f, img, emit, u_of, v_of = view.f, view.img, view.emit, view.u_of, view.v_of
    for b in place.buildings:
        u0, u1 = u_of(b.x0, z_f), u_of(b.x1, z_f)
        if u1 < 0 or u0 > W:
            continue
        st = assets.styles[b.style]
        ppm = f / z_f
        top_v = v_of(b.height, z_f)
        a, c = int(max(math.floor(u0), 0)), int(min(math.ceil(u1), W))
        r0, r1 = int(max(math.floor(top_v), 0)), int(min(v_fb, H))
        if c <= a or r1 <= r0:
            continue
        wall = tile(st.texture, st.tile_m * ppm, a - u0, r0 - top_v, c - a, r1 - r0).copy()
        emit[r0:r1, a:c] = 0  # lit windows below set their own emission
        # windows on a world-aligned grid (ground floor left blank for shop fronts)
        xs = np.arange(b.x0 + st.win_dx / 2, b.x1 - st.win_w / 2, st.win_dx)
        ys = np.arange(3.5, b.height - 1.5, st.win_dy)
        for xw in xs:
            wu0, wu1 = u_of(xw - st.win_w / 2, z_f) - a, u_of(xw + st.win_w / 2, z_f) - a
            if wu1 < 0 or wu0 > c - a:
                continue
            for yw in ys:
                wv0, wv1 = v_of(yw + st.win_h, z_f) - r0, v_of(yw, z_f) - r0
                i0, i1 = int(max(round(wv0), 0)), int(min(round(wv1), r1 - r0))
                j0, j1 = int(max(round(wu0), 0)), int(min(round(wu1), c - a))
                if i1 <= i0 or j1 <= j0:
                    continue
                fr = max(int(ppm * 0.12), 1) if ppm > 6 else 0
                wall[max(i0 - fr, 0) : i1 + fr, max(j0 - fr, 0) : j1 + fr] = st.frame
                lit = night and rng.random() < 0.45 or dusk and rng.random() < 0.15
                if lit:
                    wall[i0:i1, j0:j1] = np.array([1.0, 0.82, 0.45], np.float32) * rng.uniform(0.7, 1.0)
                    emit[r0 + i0 : r0 + i1, a + j0 : a + j1] = 1.0
                else:
                    grad = np.linspace(1.15, 0.8, i1 - i0, dtype=np.float32)[:, None, None]
                    wall[i0:i1, j0:j1] = np.array(st.glass, np.float32) * grad
        # cornice and a shop-front band
        corn = max(int(ppm * 0.5), 1)
        if top_v >= 0:
            wall[:corn] *= 0.6
        shop_top = int(round(v_of(3.0, z_f))) - r0
        if 0 <= shop_top < r1 - r0:
            wall[shop_top : shop_top + max(int(ppm * 0.4), 1)] *= 0.5
            lower = wall[shop_top + max(int(ppm * 0.4), 1) :]
            lower *= 0.75
        wall[:, : max(int(ppm * 0.15), 1)] *= 0.55  # building edge
        img[r0:r1, a:c] = wall


def _trees_and_lamps(view: View, place: Place, assets: Assets) -> None:
    """Trees and lamp posts on the sidewalk, 2 m in front of the facades."""
    H, W, f, z_f, night, dusk = view.H, view.W, view.f, view.z_f, view.night, view.dusk
    vv, uu, img, emit, u_of, v_of = view.vv, view.uu, view.img, view.emit, view.u_of, view.v_of
    z_t = z_f - 2.0
    for i, xt in enumerate(place.trees):
        ut = u_of(xt, z_t)
        if ut < -f * 3 / z_t or ut > W + f * 3 / z_t:
            continue
        ppm = f / z_t
        trunk_w = max(ppm * 0.3, 1)
        vb, vt = v_of(0, z_t), v_of(2.5, z_t)
        img[
            max(int(vt), 0) : max(min(int(vb), H), 0),
            max(int(ut - trunk_w / 2), 0) : max(min(int(ut + trunk_w / 2) + 1, W), 0),
        ] = (0.25, 0.18, 0.12)
        if i % 2 == 0:  # crown
            r = 2.2 * ppm
            cy = v_of(4.3, z_t)
            d = ((uu - ut) / r) ** 2 + ((vv - cy) / (r * 0.9)) ** 2
            m = d < 1
            if m.any():
                leaves = tile(assets.foliage, 2.5 * ppm, ut, cy, W, H)
                img[m] = leaves[m] * (1.1 - 0.4 * np.sqrt(d[m]))[:, None]
                emit[m] = 0
        else:  # lamp post
            vt = v_of(5.0, z_t)
            img[
                max(int(vt), 0) : max(min(int(vb), H), 0),
                max(int(ut - trunk_w / 3), 0) : max(min(int(ut + trunk_w / 3) + 1, W), 0),
            ] = (0.15, 0.15, 0.16)
            if night or dusk:
                d2 = (uu - ut) ** 2 + (vv - vt) ** 2
                glow = np.exp(-d2 / (2 * (0.6 * ppm) ** 2)).astype(np.float32)
                img += glow[..., None] * np.array([1.0, 0.85, 0.55], np.float32) * (1.0 if night else 0.5)
                emit = np.maximum(emit, glow)
    view.emit = emit  # the lamps' glow replaced the array


def _landmark(view: View, place: Place) -> None:
    """Pedestal and framed panel."""
    H, W, f, z_l, img, emit, spot = view.H, view.W, view.f, view.z_l, view.img, view.emit, view.spot
    u_of, v_of = view.u_of, view.v_of
    ppm = f / z_l
    ul = u_of(0, z_l)
    pw, ph = place.landmark_w * ppm, place.landmark_h * ppm
    v_base = v_of(0, z_l)
    v_pb = v_of(place.pedestal_h, z_l)
    pedw = pw * 0.35
    pa, pc = int(round(ul - pedw / 2)), int(round(ul + pedw / 2))
    pr0, pr1 = int(round(v_pb)), int(round(v_base))
    if pc > 0 and pa < W and pr1 > 0 and pr0 < H:
        sl = (slice(max(pr0, 0), min(pr1, H)), slice(max(pa, 0), min(pc, W)))
        shade = np.linspace(1.0, 0.7, max(pc - pa, 1), dtype=np.float32)[
            max(-pa, 0) : max(-pa, 0) + sl[1].stop - sl[1].start
        ]
        img[sl] = place.pedestal_color * shade[None, :, None]
        emit[sl] = 0
        spot[sl] = 1
    border = 0.06
    fw, fh = int(round(pw * (1 + 2 * border))), int(round(ph + pw * 2 * border))
    if fw >= 2 and fh >= 2:
        tex = resize(place.landmark, max(int(round(pw)), 1), max(int(round(ph)), 1), Image.Resampling.BILINEAR)
        alpha_src = Image.fromarray((place.landmark_alpha * 255).astype(np.uint8))
        panel = np.empty((fh, fw, 3), np.float32)
        panel[:] = place.frame_color
        ox, oy = (fw - tex.shape[1]) // 2, (fh - tex.shape[0]) // 2
        panel[oy : oy + tex.shape[0], ox : ox + tex.shape[1]] = tex
        alpha = np.asarray(alpha_src.resize((fw, fh), Image.Resampling.BILINEAR), np.float32) / 255.0
        x0, y0 = int(round(ul - fw / 2)), int(round(v_pb - fh))
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + fw, W), min(y0 + fh, H)
        if xb > xa and yb > ya:
            p = panel[ya - y0 : yb - y0, xa - x0 : xb - x0]
            al = alpha[ya - y0 : yb - y0, xa - x0 : xb - x0, None]
            img[ya:yb, xa:xb] = img[ya:yb, xa:xb] * (1 - al) + p * al
            emit[ya:yb, xa:xb] *= 1 - al[..., 0]
            spot[ya:yb, xa:xb] = np.maximum(spot[ya:yb, xa:xb], al[..., 0])


def _parked_car(view: View, rng: np.random.Generator) -> None:
    """A parked car in front of the curb, sometimes occluding the landmark's base."""
    H, W, f, cx, x_c, z_curb = view.H, view.W, view.f, view.cx, view.x_c, view.z_curb
    vv, uu, img, emit, spot, u_of, v_of = view.vv, view.uu, view.img, view.emit, view.spot, view.u_of, view.v_of
    if z_curb > 5.0 and rng.random() < 0.5:
        z_car = rng.uniform(max(z_curb - 2.5, 4.5), z_curb - 0.5)
        ppm_c = f / z_car
        xcar = x_c + (rng.uniform(0.1, 0.9) * W - cx) * z_car / f
        u0, u1 = u_of(xcar - 2.2, z_car), u_of(xcar + 2.2, z_car)
        vb, vm, vt = v_of(0.25, z_car), v_of(0.9, z_car), v_of(1.45, z_car)
        col = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.9), rng.uniform(0.2, 0.9)), np.float32)
        a, c = int(max(u0, 0)), int(min(u1, W))
        if c > a:
            img[int(max(vm, 0)) : int(min(vb, H)), a:c] = col
            ga, gc = int(max(u0 + 0.18 * (u1 - u0), 0)), int(min(u1 - 0.18 * (u1 - u0), W))
            if gc > ga:
                img[int(max(vt, 0)) : int(max(min(vm, H), 0)), ga:gc] = col * 0.35 + 0.08
            for wx in (u0 + 0.2 * (u1 - u0), u0 + 0.8 * (u1 - u0)):
                d = ((uu - wx) / (0.33 * ppm_c)) ** 2 + ((vv - vb) / (0.33 * ppm_c)) ** 2
                img[d < 1] = 0.05
            emit[int(max(vt, 0)) : int(min(v_of(0, z_car), H)), a:c] = 0
            spot[int(max(vt, 0)) : int(min(v_of(0, z_car), H)), a:c] = 0


def illuminate(
    img: np.ndarray, emit: np.ndarray, spot: np.ndarray, condition: str, rng: np.random.Generator
) -> np.ndarray:
    """Apply the condition's light to the reflective parts; emitters keep their own colour."""
    if condition == "day":
        light = (
            np.array([1, 1, 1], np.float32)
            * rng.uniform(0.9, 1.1)
            * np.array([1, 1, rng.uniform(0.95, 1.05)], np.float32)
        )
        lit = img * light
        spot_gain = 0.0
    elif condition == "dusk":
        light = np.array([1.0, 0.78, 0.60], np.float32) * rng.uniform(0.45, 0.6)
        lit = img * light
        spot_gain = 0.15
    else:
        light = np.array([0.70, 0.80, 1.05], np.float32) * rng.uniform(0.15, 0.22)
        lit = img * light
        spot_gain = rng.uniform(0.30, 0.45)  # the landmark is floodlit
    lit = lit + img * spot[..., None] * spot_gain * np.array([1.0, 0.93, 0.8], np.float32)
    return np.clip(lit * (1 - emit[..., None]) + img * emit[..., None], 0, 1)


def perspective_coeffs(src_quad: np.ndarray, w: int, h: int) -> list[float]:
    """PIL PERSPECTIVE coefficients mapping output corners onto ``src_quad`` (input points)."""
    dst = np.array([[0, 0], [w, 0], [w, h], [0, h]], float)
    A, b = [], []
    for (x, y), (X, Y) in zip(dst, src_quad):
        A.append([x, y, 1, 0, 0, 0, -X * x, -X * y])
        b.append(X)
        A.append([0, 0, 0, x, y, 1, -Y * x, -Y * y])
        b.append(Y)
    return [float(c) for c in np.linalg.solve(np.array(A), np.array(b))]


def finish(img: np.ndarray, condition: str, rng: np.random.Generator) -> Image.Image:
    """Camera effects: slight perspective (viewpoint), blur, sensor noise."""
    H, W = img.shape[:2]
    pil = Image.fromarray((img * 255 + 0.5).astype(np.uint8))
    # Corners moved inward by up to 5 %: a small keystone/rotation without empty borders.
    m = rng.uniform(0, 0.05, size=(4, 2)) * np.array([W, H])
    quad = np.array([[0, 0], [W, 0], [W, H], [0, H]], float) + m * np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    pil = pil.transform((W, H), Image.Transform.PERSPECTIVE, perspective_coeffs(quad, W, H), Image.Resampling.BILINEAR)
    pil = pil.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9))))
    out = np.asarray(pil, np.float32) / 255.0
    sigma = {"day": 0.01, "dusk": 0.02, "night": 0.035}[condition]
    out = out + rng.normal(0, sigma, out.shape).astype(np.float32)
    if condition == "night":  # shot noise is worse in the dark: a little chroma noise
        out = out + rng.normal(0, sigma / 2, (H, W, 1)).astype(np.float32)
    return Image.fromarray((np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8))
