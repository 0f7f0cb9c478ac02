"""hafloc's public Python API, the names of ``hafloc.__all__``: an index to build, extend and locate
photos with (``Index``), and a model, its descriptors and its benchmark score in one call each."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from .datasets.base import Dataset
from .descriptors.extract import Extractor, ExtractResult
from .descriptors.modelfile import DEFAULT, load_model as load_model_file, recorded_path
from .descriptors.network import GeoLocNet
from .errors import HaflocError, InputError
from .images.io import list_images
from .index.adapt import adapt_model
from .index.build import add_folder, auto_calibrate, local_spec
from .index.locator import LocateResult, Locator, LocatorConfig
from .index.prior import Near
from .index.search import SearchConfig
from .index.store import AddReport, IndexStore
from .metrics.evaluate import EvalResult, evaluate as evaluate_dataset


def load_model(path: str | Path | None = None) -> GeoLocNet:
    """The model in ``path`` (a file from ``hafloc model init`` / ``hafloc train``); None (or
    ``"default"``): the shipped default model, HAF trained on real street views."""
    return load_model_file(path)


def _model(model: str | Path | GeoLocNet | None) -> GeoLocNet:
    return model if isinstance(model, GeoLocNet) else load_model(model)


def _paths(images: str | Path | Sequence[str | Path]) -> list[Path]:
    return [p for p, _ in list_images([images] if isinstance(images, (str, Path)) else list(images))]


def extract(
    model: str | Path | GeoLocNet | None,
    images: str | Path | Sequence[str | Path],
    *,
    backend: str = "auto",
    batch_size: int = 8,
    max_side: int | None = None,
    progress: bool = False,
) -> ExtractResult:
    """Global descriptors of image files and folders (searched recursively), named by their paths:
    ``ExtractResult(names, descriptors (N, D) float32, failures [(name, reason)])``."""
    paths = _paths(images)
    ex = Extractor(_model(model), batch_size=batch_size, max_side=max_side, backend=backend)
    return ex.extract_paths(paths, names=[str(p) for p in paths], progress=progress)


def evaluate(
    model: str | Path | GeoLocNet | None,
    dataset: str | Path | Dataset,
    *,
    format: str | None = None,
    split: str = "test",
    progress: bool = False,
    **options: Any,
) -> EvalResult:
    """Score ``model`` on a benchmark (a dataset folder, read as ``hafloc eval`` reads it, or a
    ``Dataset``) with its protocol: recall@N in percent (``result["recall@1"]``...) or mAP.
    ``options`` go to ``hafloc.metrics.evaluate.evaluate`` (``settings``, ``cache_dir``, ``rerank``...)."""
    from .datasets.detect import load_dataset

    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, format=format, split=split)
    return evaluate_dataset(_model(model), ds, progress=progress, **options)


class Index:
    """An index folder and its model, ready to locate photos: ``Index.open(path)`` or
    ``Index.build(folder, model, index=path)``; close it (or use ``with``) when done."""

    def __init__(self, locator: Locator):
        self._locator = locator

    @classmethod
    def open(
        cls,
        path: str | Path,
        model: str | Path | GeoLocNet | None = None,
        *,
        backend: str = "auto",
        rerank: int | None = None,
        agree_m: float | None = None,
        min_confidence: float | None = None,
    ) -> Index:
        """Open the index in ``path`` with ``model`` (default: the model file it was built with).

        ``rerank``, ``agree_m``, ``min_confidence``: as ``hafloc locate``'s options of those names."""
        config = LocatorConfig(backend=backend, rerank=rerank, agree_m=agree_m, min_confidence=min_confidence)
        return cls(Locator(path, model, config))

    @classmethod
    def build(
        cls,
        folder: str | Path,
        model: str | Path | GeoLocNet | None = None,
        positions: str | Path | dict[str, tuple[float, float]] | None = None,
        local: str | dict[str, Any] | None = "auto",
        *,
        index: str | Path,
        search: str = "auto",
        chunk_size: int = 64,
        calibrate: bool = True,
        adapt: bool = True,
        backend: str = "auto",
        progress: bool = False,
    ) -> Index:
        """Index the photos of ``folder`` into the folder ``index`` (created, or resumed as ``hafloc
        index build`` resumes), then calibrate the confidences when 50 photos have a position.

        ``model``: a model file or a loaded model (None: the default model); ``positions``: a CSV
        (image,lat,lon) or ``{image: (lat, lon)}`` (else '@' names and EXIF GPS); ``local``: a local
        feature extractor (``"xfeat"``...) for re-ranking by verified matches, ``None`` for none,
        ``"auto"`` (``hafloc index build``'s default: xfeat for a new index of the default model); ``search``: ``auto``,
        ``flat``, ``ivfpq``, ``hnsw`` or ``ondisk``; ``adapt``: re-fit a trained model's clusters on
        the photos (``hafloc index build`` without ``--no-adapt``).
        """
        net = _model(model)
        if adapt:
            net = adapt_model(net, _paths(folder), index, progress=progress)
        model_path = recorded_path(net)
        store = IndexStore.open_or_create(
            index,
            net.fingerprint(),
            net.out_dim,
            SearchConfig(kind=search),
            model_path=model_path,
            local=local_spec(
                local,
                default_model=model is None or model == DEFAULT,
                new_index=not (Path(index) / "index.json").exists(),
            ),
        )
        with store:
            add_folder(store, folder, Extractor(net, backend=backend), positions, chunk_size, progress)
            if calibrate:
                auto_calibrate(store, progress=progress)
        return cls.open(index, net, backend=backend)

    @property
    def path(self) -> Path:
        """The index folder."""
        return self._locator.store.folder

    @property
    def model(self) -> GeoLocNet:
        return self._locator.model

    def __len__(self) -> int:
        return len(self._locator.store)

    def add(
        self,
        folder: str | Path,
        positions: str | Path | dict[str, tuple[float, float]] | None = None,
        *,
        chunk_size: int = 64,
        progress: bool = False,
    ) -> AddReport:
        """Index the photos of ``folder`` not yet indexed, with the index's model (``hafloc index add``)."""
        return add_folder(self._locator.store, folder, self._locator.extractor, positions, chunk_size, progress)

    def locate(
        self,
        image: str | Path | Image.Image,
        top_k: int = 10,
        rerank: int | None = None,
        near: tuple[float, float] | None = None,
        within: float | None = None,
    ) -> LocateResult:
        """Where was this photo taken? ``image``: a file or a decoded photo. ``rerank``: candidates
        verified by local matches (default: 10 when the index stores local features, else 0).
        ``near=(lat, lon), within=metres``: search only the photos that close to a known place."""
        if top_k < 1:
            raise HaflocError(f"top_k must be at least 1, got {top_k}")
        prior = Near.parse(near, within)
        if isinstance(image, Image.Image):
            record, _ = self._locator.locate_image(image.convert("RGB"), "image", top_k, False, rerank, prior)
            return LocateResult(record)
        paths = _paths(image)
        results, failures = self._locator.locate_paths(paths, [str(p) for p in paths], top_k, False, rerank, prior)
        if failures:
            raise InputError(*failures[0])
        if len(results) != 1:
            raise HaflocError(f"{image}: give one image file (got {len(results)} images)")
        return LocateResult(results[0])

    def close(self) -> None:
        self._locator.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r}, images={len(self)})"
