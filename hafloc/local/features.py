"""Local features of one image and the matches between two."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LocalFeatures:
    """Keypoints in pixels of the original image (after EXIF orientation), hloc's convention:
    the centre of the top-left pixel is (0, 0). Sorted by descending score."""

    keypoints: np.ndarray  # (N, 2) float32 (x, y)
    descriptors: np.ndarray  # (N, D) float32
    scores: np.ndarray  # (N,) float32
    image_size: tuple[int, int]  # (width, height) of the original image

    def __post_init__(self) -> None:
        self.keypoints = np.asarray(self.keypoints, dtype=np.float32).reshape(-1, 2)
        n = len(self.keypoints)
        self.descriptors = np.asarray(self.descriptors, dtype=np.float32)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        if self.descriptors.ndim != 2 or len(self.descriptors) != n or len(self.scores) != n:
            raise ValueError(f"{n} keypoints with descriptors {self.descriptors.shape} and scores {self.scores.shape}")

    def __len__(self) -> int:
        return len(self.keypoints)

    @property
    def dim(self) -> int:
        return self.descriptors.shape[1]

    @classmethod
    def empty(cls, dim: int, image_size: tuple[int, int]) -> "LocalFeatures":
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, dim), np.float32), np.zeros(0, np.float32), image_size)

    def top(self, k: int | None) -> tuple["LocalFeatures", np.ndarray]:
        """The ``k`` best-scored keypoints and their indices into ``self`` (all when k is None or larger)."""
        if k is None or k >= len(self):
            return self, np.arange(len(self))
        idx = np.sort(np.argsort(-self.scores, kind="stable")[:k])
        return LocalFeatures(self.keypoints[idx], self.descriptors[idx], self.scores[idx], self.image_size), idx


@dataclass
class MatchResult:
    matches: np.ndarray  # (M, 2) int64 index pairs into f0, f1
    scores: np.ndarray  # (M,) float32

    def __post_init__(self) -> None:
        self.matches = np.asarray(self.matches, dtype=np.int64).reshape(-1, 2)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)

    def __len__(self) -> int:
        return len(self.matches)

    @classmethod
    def empty(cls) -> "MatchResult":
        return cls(np.zeros((0, 2), np.int64), np.zeros(0, np.float32))

    def to_matches0(self, n0: int) -> tuple[np.ndarray, np.ndarray]:
        """hloc's per-keypoint form: ``matches0`` (n0,) int32 (-1 = unmatched) and ``matching_scores0`` (n0,)."""
        m0 = np.full(n0, -1, np.int32)
        s0 = np.zeros(n0, np.float32)
        m0[self.matches[:, 0]] = self.matches[:, 1]
        s0[self.matches[:, 0]] = self.scores
        return m0, s0

    @classmethod
    def from_matches0(cls, matches0: np.ndarray, scores0: np.ndarray | None = None) -> "MatchResult":
        matches0 = np.asarray(matches0).reshape(-1)
        idx = np.flatnonzero(matches0 > -1)
        scores = np.ones(len(idx), np.float32) if scores0 is None else np.asarray(scores0, np.float32).reshape(-1)[idx]
        return cls(np.stack([idx, matches0[idx]], axis=1), scores)
