"""Labelled evaluation splits, streamed feature extraction, the weighted k-NN and the raw-pixel baseline.

This module is the one place that turns a labelled source into labels and images for evaluation; the online k-NN
during training (:class:`KNNEvaluator`) and ``ibot-ray eval`` (``pipelines/evaluate.py``) both use it.

* **Listing** goes through ``pipelines/sources.py`` (``list_image_folder`` / ``list_parquet``, any pyarrow URI). A
  split is an image folder with class subfolders or Parquet with a label column (``data.label_column``).
* **One label map** for a train/val pair, taken from the train split (:class:`LabelMap`): folder -> sorted class
  subfolder names, Parquet string labels -> sorted names, Parquet integer labels as they are. A val split is mapped
  through it (by name), so a val folder that lacks a class still gets the right indices; a val class the train
  split does not have is an :class:`EvalDataError` naming it. An unlabelled split is an error naming the split.
* ``max_images`` caps a split deterministically, round-robin over classes (in listing order within a class), so a
  capped split still covers every class.
* **Streaming**: images are read and decoded in chunks by a small thread pool (:func:`iter_decoded`); a consumer
  keeps only what it needs (features), never all decoded images. Undecodable images are skipped and counted.

The k-NN protocol (DINO/iBOT): [CLS] features of the memory bank (train split) and of the queries (val split),
L2-normalised, cosine similarity, ``eval.knn_k`` = 20 neighbours, temperature ``eval.knn_temperature`` = 0.07.

**Raw-pixel baseline** (:func:`pixel_view_for`, :func:`best_pixel_knn`): the same weighted k-NN on the images as
stored, flattened. If the first bank image is at most 64 px on each side, every image is converted to that image's
(H, W) (bicubic) and channel count (a grey first image: 1 channel, colour images converted to luminance; a colour
first image: 3 channels, grey replicated); larger images use the eval view (``ibot_ray.knn.eval_transform``) at 32 px.
Two variants are scored, the raw pixels and the per-image mean-centred pixels; the better top-1 is reported with
the name of the variant that won (so the baseline is never a strawman). :func:`pixel_baseline` is the one place
that computes it, for the online k-NN and for ``ibot-ray eval`` alike: each split decoded for the pixel view alone.

``"demo"`` as a source means the shipped Fashion-MNIST sample (train split -> ``train.parquet``, val -> ``test``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from ibot_ray.config import IBOTConfig
from ibot_ray.decode import ImageDecodeError, apply_draft, draft_scale, open_image, to_rgb_array
from ibot_ray.knn import CROP_FRACTION, eval_transform, extract_features, knn_classify
from pipelines.sources import (
    DEMO_CLASS_NAMES,
    SourceError,
    _has_image_extension,
    _list_files,
    detect_format,
    list_image_folder,
    list_parquet,
    resolve_source,
)

log = logging.getLogger(__name__)

#: Images are decoded and featurised this many at a time.
DEFAULT_CHUNK_SIZE = 256
#: Raw-pixel baseline: images up to this many pixels per side are compared as stored.
PIXEL_AS_STORED_MAX = 64
#: Raw-pixel baseline: larger images use the eval view at this size.
PIXEL_EVAL_SIZE = 32
_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class EvalDataError(SourceError):
    """An evaluation split is missing, unlabelled or has a class the train split lacks; the message names it."""


# ---- listing and the shared label map --------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelMap:
    """The label space of a train/val pair, taken from the train split.

    ``by_name``: labels are class names (folder subfolders, Parquet string labels) mapped to ``names.index``; else
    labels are integers used as they are (``names`` then holds the Parquet ``class_names`` metadata, if any).
    ``present``: the class indices the train split has.
    """

    names: Optional[tuple[str, ...]]
    by_name: bool
    present: frozenset

    @property
    def num_classes(self) -> int:
        n = max(self.present) + 1 if self.present else 0
        return max(n, len(self.names)) if self.names else n

    def name(self, label: int) -> str:
        return self.names[label] if self.names and 0 <= label < len(self.names) else str(label)


@dataclass
class LabelledSource:
    """A listed labelled split: what to read (in order) and its labels in the shared :class:`LabelMap`."""

    split: str  # "train" / "val": used in messages
    uri: str
    format: str  # "folder" or "parquet"
    fs: Any
    label_map: LabelMap
    num_listed: int  # labelled images listed (before max_images)
    paths: list[str] = field(default_factory=list, repr=False)  # folder: file per selected item
    rows: list[tuple[str, int]] = field(default_factory=list, repr=False)  # parquet: (file, row) per selected item
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)  # int64, per item
    unlabelled_rows: int = 0  # Parquet rows with a null label, left out
    image_column: str = "image"

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _strip_prefix(msg: str) -> str:
    return msg.split(": ", 1)[1] if msg.startswith("data.source: ") else msg


def _raw_listing(source: str, cfg: IBOTConfig, split: str) -> tuple[str, str, Any, list, list, Optional[list[str]]]:
    """(uri, format, fs, items, raw labels, int-label class names) of a split; raw labels are names or ints."""
    d = cfg.data
    try:
        uri = resolve_source(source, "train" if split == "train" else "test")
        fmt = "parquet" if source == "demo" else detect_format(uri, d.format)
        if fmt == "folder":
            info, root, fs = list_image_folder(uri)
            if not info.has_labels:
                raise EvalDataError(f"{split} split {source!r} is unlabelled: a flat image folder; evaluation needs "
                                    "class subfolders (root/<class>/<image>) or Parquet with a label column")
            base = root.rstrip("/")
            items = [p for p, _ in _list_files(fs, root) if _has_image_extension(p)]
            raw = [p[len(base):].lstrip("/").split("/", 1)[0] for p in items]
            return uri, fmt, fs, items, raw, None
        info, _units, fs, class_to_idx = list_parquet(uri, d.image_column, d.label_column or None)
    except EvalDataError:
        raise
    except SourceError as e:
        raise EvalDataError(f"{split} split {source!r}: {_strip_prefix(str(e))}") from None
    if not info.has_labels:
        raise EvalDataError(f"{split} split {source!r} is unlabelled: its Parquet files have no label column "
                            f"{d.label_column!r} (set data.label_column)")
    items, raw = [], []
    for path in info.files:
        with fs.open_input_file(path) as f:
            col = pq.ParquetFile(f).read(columns=[d.label_column]).column(d.label_column).to_pylist()
        items += [(path, i) for i in range(len(col))]
        raw += col
    names = info.class_names if class_to_idx is None else None
    if source == "demo" and names is None:
        names = list(DEMO_CLASS_NAMES)
    return uri, fmt, fs, items, raw, names


def round_robin(labels: np.ndarray, max_images: Optional[int]) -> np.ndarray:
    """Indices of at most ``max_images`` items, round-robin over classes (ascending class, listing order within)."""
    if max_images is None or max_images >= len(labels):
        return np.arange(len(labels))
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(labels)) - starts  # position of each item within its class
    key = np.lexsort((sorted_labels, rank))  # by rank, then class
    picked = order[key[:max_images]]
    return np.sort(picked)  # read in listing order (sequential Parquet reads)


def open_labelled(source: str, cfg: IBOTConfig, *, split: str = "train", label_map: Optional[LabelMap] = None,
                  max_images: Optional[int] = None) -> LabelledSource:
    """List a labelled split (no image is read). Without ``label_map`` the split defines it (a train split)."""
    uri, fmt, fs, items, raw, int_names = _raw_listing(source, cfg, split)
    keep = [i for i, v in enumerate(raw) if v is not None]
    unlabelled = len(raw) - len(keep)
    if unlabelled:
        log.warning("%s split %s: %d rows with a null label left out", split, source, unlabelled)
        items = [items[i] for i in keep]
        raw = [raw[i] for i in keep]
    if not raw:
        raise EvalDataError(f"{split} split {source!r} has no labelled images")
    is_name = isinstance(raw[0], str)
    if label_map is None:
        if is_name:
            names = tuple(sorted(set(raw)))
            label_map = LabelMap(names, True, frozenset(range(len(names))))
        else:
            label_map = LabelMap(tuple(int_names) if int_names else None, False, frozenset(int(v) for v in set(raw)))
    if label_map.by_name:
        index = {n: i for i, n in enumerate(label_map.names)}
        if not is_name:  # integer labels against named classes: only through the file's class names
            if not int_names:
                raise EvalDataError(f"{split} split {source!r} has integer labels but the train split has named "
                                    f"classes ({', '.join(label_map.names[:5])}, ...); give both splits the same "
                                    "kind of labels")
            raw = [int_names[v] if 0 <= v < len(int_names) else str(v) for v in raw]
        unknown = sorted({v for v in raw if v not in index})
        if unknown:
            raise EvalDataError(f"{split} split {source!r} has class {unknown[0]!r}"
                                f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}, which the train "
                                f"split does not have (train classes: {', '.join(label_map.names[:10])}"
                                f"{', ...' if len(label_map.names) > 10 else ''})")
        labels = np.fromiter((index[v] for v in raw), np.int64, len(raw))
    else:
        if is_name:
            raise EvalDataError(f"{split} split {source!r} has named classes but the train split has integer labels; "
                                "give both splits the same kind of labels")
        labels = np.asarray(raw, dtype=np.int64)
        unknown = sorted(set(np.unique(labels).tolist()) - label_map.present)
        if unknown:
            raise EvalDataError(f"{split} split {source!r} has class {label_map.name(unknown[0])!r}"
                                f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}, which the train "
                                "split does not have")
    picked = round_robin(labels, max_images)
    out = LabelledSource(split=split, uri=uri, format=fmt, fs=fs, label_map=label_map, num_listed=len(labels),
                         labels=labels[picked], unlabelled_rows=unlabelled,
                          image_column=cfg.data.image_column)
    if fmt == "folder":
        out.paths = [items[i] for i in picked]
    else:
        out.rows = [items[i] for i in picked]
    return out


def open_labelled_pair(train: str, val: str, cfg: IBOTConfig, *,
                       max_images: Optional[int] = None) -> tuple[LabelledSource, LabelledSource]:
    """List a train/val pair with one label map (the train split's)."""
    bank = open_labelled(train, cfg, split="train", max_images=max_images)
    queries = open_labelled(val, cfg, split="val", label_map=bank.label_map, max_images=max_images)
    return bank, queries


# ---- reading and decoding ----------------------------------------------------------------------------------------


def _iter_raw(src: LabelledSource, chunk_size: int) -> Iterator[list[tuple[Any, int, str]]]:
    """Chunks of ``(bytes or folder path, label, key)``; Parquet bytes are read here (only the row groups holding
    selected rows, in record batches), folder files are read by the decoding threads."""
    if src.format == "folder":
        for i in range(0, len(src.paths), chunk_size):
            yield [(p, int(y), p) for p, y in zip(src.paths[i:i + chunk_size], src.labels[i:i + chunk_size])]
        return
    chunk: list[tuple[Any, int, str]] = []
    pos = 0
    while pos < len(src.rows):
        path = src.rows[pos][0]
        end = pos
        while end < len(src.rows) and src.rows[end][0] == path:
            end += 1
        wanted = {src.rows[j][1]: int(src.labels[j]) for j in range(pos, end)}
        ordered = np.array(sorted(wanted), dtype=np.int64)
        with src.fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            offset = 0
            for rg in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                if offset > ordered[-1]:
                    break
                lo = np.searchsorted(ordered, offset)
                if lo == len(ordered) or ordered[lo] >= offset + n:  # no selected row in this row group
                    offset += n
                    continue
                row = offset
                for batch in pf.iter_batches(batch_size=1024, row_groups=[rg], columns=[src.image_column]):
                    values = batch.column(0)
                    for j in range(batch.num_rows):
                        label = wanted.get(row + j)
                        if label is not None:
                            chunk.append((values[j].as_py(), label, f"{path}#{row + j}"))
                            if len(chunk) >= chunk_size:
                                yield chunk
                                chunk = []
                    row += batch.num_rows
                offset += n
        pos = end
    if chunk:
        yield chunk


@dataclass
class DecodedChunk:
    views: dict[str, torch.Tensor]  # view name -> uint8 (B, C, H, W)
    labels: torch.Tensor  # int64 (B,)
    skipped: list[tuple[str, str]]  # (key, reason) of the undecodable images of this chunk


def _decode(item: tuple[Any, int, str], fs: Any, views: dict[str, Callable], max_pixels: int,
            min_side: Optional[int]) -> tuple[Optional[dict], int, str, str]:
    data, label, key = item
    try:
        if isinstance(data, str):
            with fs.open_input_file(data) as f:
                data = f.read()
        img = open_image(data, max_pixels=max_pixels)
        grey = img.mode in _GREY_MODES
        if min_side is not None:
            apply_draft(img, draft_scale(img.size, min_side))
        arr = to_rgb_array(img)
        return {name: fn(arr, grey) for name, fn in views.items()}, label, key, ""
    except (ImageDecodeError, OSError) as e:
        return None, label, key, f"{type(e).__name__}: {e}"


def iter_decoded(src: LabelledSource, views: dict[str, Callable[[np.ndarray, bool], np.ndarray]], cfg: IBOTConfig, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, workers: Optional[int] = None,
                 min_side: Optional[int] = None) -> Iterator[DecodedChunk]:
    """Read + decode + transform a split chunk by chunk in a thread pool (the next chunk decodes while the caller
    works on the current one). ``views`` map ``(RGB uint8 (H, W, 3), stored-as-grey)`` to a (C, H, W) uint8 array.
    ``min_side``: JPEGs are DCT-downscaled while decoding as long as the shorter side stays >= it."""
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    max_pixels = cfg.data.max_image_pixels

    def collect(futures) -> DecodedChunk:
        out: dict[str, list] = {name: [] for name in views}
        labels, skipped = [], []
        for fut in futures:
            arrs, label, key, why = fut.result()
            if arrs is None:
                skipped.append((key, why))
                log.warning("%s split %s: skipped an undecodable image %s (%s)", src.split, src.uri, key, why)
                continue
            for name in views:
                out[name].append(arrs[name])
            labels.append(label)
        stacked = {name: torch.from_numpy(np.stack(v)) if v else torch.zeros(0, dtype=torch.uint8)
                   for name, v in out.items()}
        return DecodedChunk(stacked, torch.tensor(labels, dtype=torch.int64), skipped)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="eval-decode") as pool:
        pending = None
        for items in _iter_raw(src, chunk_size):
            futures = [pool.submit(_decode, it, src.fs, views, max_pixels, min_side) for it in items]
            if pending is not None:
                yield collect(pending)
            pending = futures
        if pending is not None:
            yield collect(pending)


def eval_view(size: int) -> Callable[[np.ndarray, bool], np.ndarray]:
    """The model's eval view (resize + centre crop, ``ibot_ray.knn.eval_transform``) as an :func:`iter_decoded` view."""
    return lambda arr, grey: eval_transform(arr, size)


def eval_min_side(size: int) -> int:
    """Shorter side the eval view resizes to; JPEGs may be DCT-downscaled to no less than this."""
    return int(round(size / CROP_FRACTION))


# ---- the raw-pixel view ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelView:
    """The raw-pixel baseline's view: as stored at ``size`` (H, W) with ``channels``, or the eval view at 32 px."""

    size: Optional[tuple[int, int]]  # None: eval view at PIXEL_EVAL_SIZE
    channels: int

    def __call__(self, arr: np.ndarray, grey: bool) -> np.ndarray:
        if self.size is None:
            return eval_transform(arr, PIXEL_EVAL_SIZE)
        h, w = self.size
        if self.channels == 1:
            img = Image.fromarray(np.ascontiguousarray(arr[:, :, 0]) if grey else np.ascontiguousarray(arr))
            img = img if grey else img.convert("L")
        else:
            img = Image.fromarray(np.ascontiguousarray(arr))
        if img.size != (w, h):
            img = img.resize((w, h), Image.BICUBIC)
        out = np.asarray(img)
        return np.ascontiguousarray(out[None] if out.ndim == 2 else out.transpose(2, 0, 1))

    def describe(self) -> str:
        if self.size is None:
            return f"eval view {PIXEL_EVAL_SIZE}x{PIXEL_EVAL_SIZE}x3"
        return f"as stored {self.size[0]}x{self.size[1]}x{self.channels}"

    @property
    def min_side(self) -> int:
        return eval_min_side(PIXEL_EVAL_SIZE) if self.size is None else max(self.size)


def pixel_view_for(src: LabelledSource, cfg: IBOTConfig) -> PixelView:
    """The :class:`PixelView` fixed by the first decodable image of the bank ``src``."""
    for chunk in iter_decoded(src, {"first": lambda arr, grey: np.array([arr.shape[0], arr.shape[1], 1 if grey else 3],
                                                                        np.int64)}, cfg, chunk_size=8, workers=1):
        if len(chunk.labels):
            h, w, c = chunk.views["first"][0].tolist()
            if h <= PIXEL_AS_STORED_MAX and w <= PIXEL_AS_STORED_MAX:
                return PixelView((int(h), int(w)), int(c))
            return PixelView(None, 3)
    raise EvalDataError(f"{src.split} split {src.uri!r}: no decodable image")


def pixel_features(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, C, H, W) -> (raw, mean-centred) flattened float32 pixel features."""
    raw = batch.flatten(1).float()
    return raw, raw - raw.mean(dim=1, keepdim=True)


# ---- k-NN on features --------------------------------------------------------------------------------------------


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 cfg: IBOTConfig, num_classes: int) -> dict:
    """The configured weighted k-NN (``eval.knn_k``, ``eval.knn_temperature``): {"top1", "top5"} in percent."""
    r = knn_classify(bank, bank_labels, queries, query_labels, k=cfg.eval.knn_k,
                     temperature=cfg.eval.knn_temperature, num_classes=num_classes)
    return {"top1": float(r["top1"]), "top5": float(r["top5"])}


def best_pixel_knn(bank: dict[str, torch.Tensor], bank_labels: torch.Tensor, queries: dict[str, torch.Tensor],
                   query_labels: torch.Tensor, cfg: IBOTConfig, num_classes: int) -> dict:
    """k-NN of the "raw" and "centred" pixel features; the better top-1 wins (ties: raw).

    Returns {"top1", "top5", "variant", "raw": {...}, "centred": {...}}."""
    scores = {v: knn_accuracy(bank[v], bank_labels, queries[v], query_labels, cfg, num_classes)
              for v in ("raw", "centred")}
    best = "centred" if scores["centred"]["top1"] > scores["raw"]["top1"] else "raw"
    return {"top1": scores[best]["top1"], "top5": scores[best]["top5"], "variant": best, **scores}


def feature_dtype(n: int, d: int) -> torch.dtype:
    """float32 for banks up to 2 GiB of features, float16 beyond (N x D is all that is kept)."""
    return torch.float32 if n * d * 4 <= 2 ** 31 else torch.float16


class FeatureBuffer:
    """Preallocated (N, D) feature storage filled chunk by chunk (D is known from the first chunk)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: Optional[torch.Tensor] = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        if self.data is None:
            self.data = torch.empty(self.capacity, x.shape[1], dtype=feature_dtype(self.capacity, x.shape[1]))
        self.data[self.n:self.n + len(x)] = x.to(self.data.dtype)
        self.n += len(x)

    def result(self) -> torch.Tensor:
        assert self.data is not None
        return self.data[:self.n]


@dataclass
class PixelSplit:
    raw: torch.Tensor
    centred: torch.Tensor
    labels: torch.Tensor
    skipped: list


def pixel_split_features(src: LabelledSource, view: PixelView, cfg: IBOTConfig, *,
                         chunk_size: int = DEFAULT_CHUNK_SIZE) -> PixelSplit:
    """Stream a split through the pixel view; keep only the raw and centred pixel features and the labels."""
    raw, cen = FeatureBuffer(len(src)), FeatureBuffer(len(src))
    labels, skipped = [], []
    for chunk in iter_decoded(src, {"pixels": view}, cfg, chunk_size=chunk_size, min_side=view.min_side):
        skipped += chunk.skipped
        if len(chunk.labels):
            r, c = pixel_features(chunk.views["pixels"])
            raw.add(r)
            cen.add(c)
            labels.append(chunk.labels)
    if not labels:
        raise EvalDataError(f"{src.split} split {src.uri!r}: no decodable labelled images")
    return PixelSplit(raw.result(), cen.result(), torch.cat(labels), skipped)


def pixel_baseline(bank_src: LabelledSource, query_src: LabelledSource, cfg: IBOTConfig, num_classes: int, *,
                   device: torch.device | str = "cpu", chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict:
    """The raw-pixel k-NN baseline of a bank/query pair, the one number the online k-NN and ``ibot-ray eval`` both
    report: the view fixed by the bank's first image, each split decoded for that view alone (a JPEG at the draft
    scale the view needs, whatever other views want).

    Returns :func:`best_pixel_knn`'s dict and ``"view"``."""
    view = pixel_view_for(bank_src, cfg)
    b = pixel_split_features(bank_src, view, cfg, chunk_size=chunk_size)
    q = pixel_split_features(query_src, view, cfg, chunk_size=chunk_size)
    r = best_pixel_knn({"raw": b.raw.to(device), "centred": b.centred.to(device)}, b.labels,
                       {"raw": q.raw, "centred": q.centred}, q.labels, cfg, num_classes)
    return {**r, "view": view.describe()}


# ---- decoded splits for the online k-NN --------------------------------------------------------------------------


@dataclass
class LabelledSplit:
    images: torch.Tensor  # uint8 (N, 3, S, S), the eval view
    labels: torch.Tensor  # int64 (N,)
    skipped: int  # undecodable images left out
    num_classes: int = 0
    source: Optional[LabelledSource] = None


def _decode_split(src: LabelledSource, cfg: IBOTConfig) -> LabelledSplit:
    size = cfg.eval.image_size
    imgs, labels, skipped = [], [], 0
    for chunk in iter_decoded(src, {"eval": eval_view(size)}, cfg, min_side=eval_min_side(size)):
        skipped += len(chunk.skipped)
        if len(chunk.labels):
            imgs.append(chunk.views["eval"])
            labels.append(chunk.labels)
    if not imgs:
        raise EvalDataError(f"{src.split} split {src.uri!r}: no decodable labelled images")
    return LabelledSplit(torch.cat(imgs), torch.cat(labels), skipped, src.label_map.num_classes, src)


def load_labelled_split(source: str, cfg: IBOTConfig, *, max_images: Optional[int] = None,
                        label_map: Optional[LabelMap] = None, split: str = "train") -> LabelledSplit:
    """Decode and eval-transform up to ``max_images`` (default ``data.eval_max_images``) labelled images, taken
    round-robin over classes; undecodable ones are counted and skipped. Small splits only (images are kept)."""
    src = open_labelled(source, cfg, split=split, label_map=label_map,
                        max_images=max_images or cfg.data.eval_max_images)
    return _decode_split(src, cfg)


class KNNEvaluator:
    """The online k-NN: the two decoded eval splits of a run (``data.eval_max_images`` each, one label map).

    Built from the run's :class:`~pipelines.eval_split.EvalPlan` (``KNNEvaluator(cfg, plan)``; without a plan the
    config's own is made: the training source listed, then planned). The driver decodes the splits once; rank 0
    gets them through the object store (:meth:`splits` / :meth:`from_splits`) instead of listing and decoding again
    at every restart.

    ``evaluate(backbone)`` -> {"knn_top1", "knn_top5"} in percent, from ``features(backbone)`` (bank, queries);
    ``pixel_baseline()`` -> {"knn_top1", "knn_top5", "variant": "raw" | "centred", "view"}, the raw-pixel baseline
    on the same splits (computed once). ``split``: the split's name, for every line that shows a figure.
    """

    def __init__(self, cfg: IBOTConfig, plan=None) -> None:
        if plan is None:
            from pipelines.eval_split import plan_evaluation
            from pipelines.sources import list_source

            plan = plan_evaluation(cfg, list_source(cfg))
        if not plan.enabled:
            raise EvalDataError(f"no labelled split for the k-NN: {plan.why_none}")
        self.cfg = cfg
        self.split = plan.split
        self.num_classes = max(plan.bank.label_map.num_classes, int(plan.queries.labels.max(initial=-1)) + 1)
        self.bank = _decode_split(plan.bank, cfg)
        self.queries = _decode_split(plan.queries, cfg)
        self._pixel: Optional[dict] = None

    def splits(self) -> tuple:
        """What :meth:`from_splits` needs (decoded images and labels; no file system), to ship to rank 0."""
        strip = lambda s: LabelledSplit(s.images, s.labels, s.skipped, s.num_classes)  # noqa: E731
        return strip(self.bank), strip(self.queries), self.num_classes, self.split

    @classmethod
    def from_splits(cls, cfg: IBOTConfig, splits: tuple) -> KNNEvaluator:
        self = cls.__new__(cls)
        self.cfg = cfg
        self.bank, self.queries, self.num_classes, self.split = splits
        self._pixel = None
        return self

    @torch.no_grad()
    def features(self, backbone: torch.nn.Module, *, device: torch.device | str = "cpu",
                 batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's [CLS] features of the bank and of the queries (what the k-NN reads)."""
        def batches(x: torch.Tensor):
            for i in range(0, len(x), batch_size):
                yield x[i:i + batch_size]

        return (extract_features(backbone, batches(self.bank.images), device=device),
                extract_features(backbone, batches(self.queries.images), device=device))

    def evaluate(self, backbone: torch.nn.Module, *, device: torch.device | str = "cpu", batch_size: int = 256) -> dict:
        fb, fq = self.features(backbone, device=device, batch_size=batch_size)
        r = knn_accuracy(fb, self.bank.labels, fq, self.queries.labels, self.cfg, self.num_classes)
        return {"knn_top1": r["top1"], "knn_top5": r["top5"]}

    def pixel_baseline(self) -> dict:
        """The raw-pixel k-NN baseline on the configured splits (the view is fixed by the first bank image)."""
        if self._pixel is None:
            bank_src, query_src = self.bank.source, self.queries.source
            if bank_src is None:
                raise ValueError("pixel_baseline needs the listed splits: call it on the driver's evaluator")
            r = pixel_baseline(bank_src, query_src, self.cfg, self.num_classes)
            self._pixel = {"knn_top1": r["top1"], "knn_top5": r["top5"], "variant": r["variant"], "view": r["view"]}
        return dict(self._pixel)


__all__ = [
    "DecodedChunk", "EvalDataError", "FeatureBuffer", "KNNEvaluator", "LabelMap", "LabelledSource", "LabelledSplit",
    "PixelSplit", "PixelView", "best_pixel_knn", "eval_min_side", "eval_view", "feature_dtype",
    "iter_decoded", "knn_accuracy", "load_labelled_split", "open_labelled", "open_labelled_pair", "round_robin",
    "pixel_baseline", "pixel_features", "pixel_split_features", "pixel_view_for",
]
