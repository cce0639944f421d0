"""The labelled split a run is judged on, chosen from its own data.

The online k-NN, its two baselines (random initialisation, raw pixels) and the closing verdict of ``ibot-ray
pretrain`` are all measured on one split, chosen here from the run's listing (:func:`plan_evaluation`):

============================  =====================================================================================
``data.eval_source``          queries (val) / memory bank (train)
============================  =====================================================================================
``auto`` (default), the demo  the demo's test split / its training images (the shipped Fashion-MNIST sample)
``auto``, a labelled source   a **held-out split** of the source (class subfolders, or a label column): stratified
                              over the classes, deterministic (``data.seed``), kept out of training / up to
                              ``data.eval_max_images`` of the training images
``auto``, an unlabelled one   no k-NN: nothing about other data is shown (the summary says how to get a figure)
a source (folder, Parquet,    that split / ``data.eval_train_source`` when set, else the training images
URI, ``demo``)
``null``                      no k-NN
============================  =====================================================================================

**The held-out split.** Its size is ``ceil(data.eval_holdout_fraction x N)`` labelled images, at least
``min(200, N / 5)`` (fewer queries than that make a k-NN figure move by points per image) and at most
``data.eval_max_images``. Each class gives its share of it (largest remainder; every class keeps at least one
training image), drawn with a generator seeded by ``data.seed``. The held-out images are **not trained on** (the
usual protocol: a k-NN on images the teacher was distilled on overstates what it learned); they leave the training
listing, so the epoch length counts the training images only.

**The driver stays small.** Nothing is listed again: the bank and the held-out split are drawn from the training
listing. A Parquet source's labels are read from a sample of its read units only (only the label column), a folder's
from the sampled paths: at most :data:`LABEL_SAMPLE_ROWS` rows whatever the source's size, so a 100M-row source costs
the driver what a 100k-row one does. Up to that size the sample is the whole source and the split is exactly
stratified; above it, stratified over a uniform sample of that size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from ibot_ray.config import AUTO, IBOTConfig
from pipelines.knn_eval import EvalDataError, LabelledSource, LabelMap, open_labelled, round_robin
from pipelines.sources import (
    DEMO_DIR,
    SourceListing,
    folder_labels,
    parquet_unit_labels,
    resolve_source,
)

#: Labels read from the training listing at most (the bank and the held-out split are drawn from these).
LABEL_SAMPLE_ROWS = 100_000
#: A held-out split has at least this many images (or a fifth of a smaller source).
MIN_HOLDOUT = 200
#: Salt of the generator that draws the held-out split and the label sample (with ``data.seed``).
_HOLDOUT_SALT = 0x686F6C64


@dataclass
class EvalPlan:
    """What a run is judged on, and what it trains on.

    ``kind``: ``"demo"``, ``"held_out"``, ``"explicit"`` or ``"none"``. ``train_listing``: the listing the run
    trains on (the held-out images removed). ``bank`` / ``queries``: the listed (not yet decoded) labelled splits, or
    None. ``split``: the split's name in every k-NN line, e.g. ``"held-out split of photos/ (80 images, 14
    classes)"``; ``why_none``: for a run without k-NN, one line on how to get a quality figure."""

    kind: str
    train_listing: SourceListing
    bank: Optional[LabelledSource] = None
    queries: Optional[LabelledSource] = None
    split: str = ""
    label: str = ""  # short name for progress lines: "held-out split", "demo test split", the val source
    why_none: str = ""
    held_out: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.queries is not None


def holdout_size(n: int, fraction: float, cap: int) -> int:
    """Images held out of ``n`` labelled ones: ``ceil(fraction x n)``, at least ``min(MIN_HOLDOUT, n // 5)``, at
    most ``cap`` (and never more than half)."""
    want = max(math.ceil(fraction * n), min(MIN_HOLDOUT, n // 5))
    return int(max(0, min(want, cap, n // 2)))


def stratified_pick(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``k`` items, each class contributing its share (largest remainder), every class keeping at least
    one item unpicked; within a class the items are drawn by ``rng``. Sorted."""
    classes, counts = np.unique(labels, return_counts=True)
    limit = counts - 1  # every class keeps one item
    k = int(min(k, limit.sum()))
    if k <= 0:
        return np.zeros(0, np.int64)
    exact = counts * (k / counts.sum())
    quota = np.minimum(np.floor(exact).astype(np.int64), limit)
    order = np.argsort(-(exact - quota), kind="stable")  # largest remainders first
    while quota.sum() < k:
        for c in order:
            if quota.sum() >= k:
                break
            if quota[c] < limit[c]:
                quota[c] += 1
    picked = []
    for c, q in zip(classes, quota):
        members = np.flatnonzero(labels == c)
        picked.append(members[rng.permutation(len(members))[:q]])
    return np.sort(np.concatenate(picked))


def _label_map(listing: SourceListing, sample_labels: np.ndarray) -> LabelMap:
    """The training listing's label space: class names (folder subfolders, Parquet string labels) or integers."""
    if listing.class_to_idx is not None:
        names = tuple(sorted(listing.class_to_idx, key=listing.class_to_idx.get))
        return LabelMap(names, True, frozenset(range(len(names))))
    names = tuple(listing.info.class_names) if listing.info.class_names else None
    return LabelMap(names, False, frozenset(int(v) for v in np.unique(sample_labels) if v >= 0))


@dataclass
class LabelSample:
    """Labelled items sampled from a listing: folder ``paths`` or Parquet ``rows`` ((file, row), and the read unit
    of each in ``units``), their int labels (-1: none), in listing order."""

    labels: np.ndarray
    paths: list[str] = field(default_factory=list)
    rows: list[tuple[str, int]] = field(default_factory=list)
    units: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    complete: bool = True  # the sample is the whole listing


def sample_labels(listing: SourceListing, max_rows: int, seed: int) -> LabelSample:
    """Up to ``max_rows`` items of the listing with their labels, drawn uniformly (folder: images; Parquet: whole
    read units, only their label column read), in listing order."""
    rng = np.random.default_rng([int(seed), _HOLDOUT_SALT, 1])
    if listing.info.format == "folder":
        n = len(listing.paths)
        idx = np.arange(n) if n <= max_rows else np.sort(rng.choice(n, max_rows, replace=False))
        paths = [listing.paths[i] for i in idx]
        return LabelSample(folder_labels(paths, listing.root or "", listing.class_to_idx), paths=paths,
                           complete=n <= max_rows)
    order = np.arange(len(listing.units))
    total = sum(int(u["length"]) for u in listing.units)
    if total > max_rows:
        order = rng.permutation(len(listing.units))
        take, rows = [], 0
        for u in order:
            if rows >= max_rows:
                break
            take.append(u)
            rows += int(listing.units[u]["length"])
        order = np.sort(np.asarray(take, np.int64))
    labels, rows, units = [], [], []
    for u, unit_labels in zip(order, parquet_unit_labels(listing, order)):
        unit = listing.units[u]
        first = int(unit["first_row"])
        rows += [(str(unit["path"]), first + i) for i in range(len(unit_labels))]
        labels.append(unit_labels)
        units.append(np.full(len(unit_labels), u, np.int64))
    return LabelSample(np.concatenate(labels) if labels else np.zeros(0, np.int64), rows=rows,
                       units=np.concatenate(units) if units else np.zeros(0, np.int64), complete=total <= max_rows)


def _labelled(listing: SourceListing, sample: LabelSample, idx: np.ndarray, label_map: LabelMap,
              split: str) -> LabelledSource:
    out = LabelledSource(split=split, uri=listing.info.uri, format=listing.info.format, fs=listing.fs,
                         label_map=label_map, num_listed=int((sample.labels >= 0).sum()),
                         labels=sample.labels[idx].astype(np.int64), image_column=listing.image_column)
    if listing.info.format == "folder":
        out.paths = [sample.paths[i] for i in idx]
    else:
        out.rows = [sample.rows[i] for i in idx]
    return out


def without_items(listing: SourceListing, sample: LabelSample, idx: np.ndarray) -> SourceListing:
    """The listing without the sampled items ``idx`` (folder: paths dropped; Parquet: rows excluded from their read
    units, which then read them never)."""
    if not len(idx):
        return listing
    info = replace(listing.info, num_items=listing.info.num_items - len(idx))
    if listing.info.format == "folder":
        gone = {sample.paths[i] for i in idx}
        paths = [p for p in listing.paths if p not in gone]
        return replace(listing, info=replace(info, files=paths), paths=paths, _unit_rows=None)
    units = list(listing.units)
    by_unit: dict[int, list[int]] = {}
    for i in idx:
        by_unit.setdefault(int(sample.units[i]), []).append(sample.rows[i][1])
    for u, rows in by_unit.items():
        units[u] = {**units[u], "excluded": sorted(set(units[u].get("excluded", ())) | set(rows))}
    return replace(listing, info=info, units=units, _unit_rows=None)


def plan_evaluation(cfg: IBOTConfig, listing: SourceListing) -> EvalPlan:
    """Choose the run's evaluation split from its config and training listing (see the module doc). Raises
    :class:`EvalDataError` for an explicit split that is missing or unlabelled."""
    d = cfg.data
    source = d.eval_source
    if not source:
        return EvalPlan("none", listing, why_none="the online k-NN is off (data.eval_source is null)")
    max_images = d.eval_max_images
    if source == AUTO and d.source == "demo":
        source = "demo"
    if source == AUTO:
        if not listing.info.has_labels:
            kind = ("flat image folder" if listing.info.format == "folder"
                    else f"Parquet source without a {d.label_column!r} column")
            return EvalPlan("none", listing, why_none=(
                f"{d.source} is unlabelled (a {kind}), so no k-NN was measured. To get a quality "
                "figure: put the images in class subfolders (or give Parquet a label column, data.label_column) "
                "and a held-out split is judged automatically; or set data.eval_source to a labelled split; or run "
                "'ibot-ray eval MODEL --train LABELLED --val LABELLED' on the export"))
        sample = sample_labels(listing, LABEL_SAMPLE_ROWS, d.seed)
        labelled = np.flatnonzero(sample.labels >= 0)
        n_labelled = round(len(labelled) * listing.info.num_items / max(1, len(sample.labels)))
        k = holdout_size(n_labelled, d.eval_holdout_fraction, max_images)
        rng = np.random.default_rng([int(d.seed), _HOLDOUT_SALT, 2])
        held = labelled[stratified_pick(sample.labels[labelled], k, rng)]
        if not len(held):
            raise EvalDataError(f"{d.source}: too few labelled images to hold any out for the online "
                                "k-NN (every class needs two); set data.eval_source to a labelled split, or to null")
        label_map = _label_map(listing, sample.labels)
        rest = np.setdiff1d(labelled, held)
        bank = rest[round_robin(sample.labels[rest], max_images)]
        plan = EvalPlan("held_out", without_items(listing, sample, held),
                        bank=_labelled(listing, sample, bank, label_map, "train"),
                        queries=_labelled(listing, sample, held, label_map, "val"), held_out=len(held),
                        label="held-out split")
        n_classes = len(np.unique(sample.labels[held]))
        plan.split = (f"held-out split of {d.source} ({len(held)} images of {n_classes} classes, "
                      f"kept out of training)")
        if not sample.complete:
            plan.notes.append(f"the held-out split and the bank are drawn from a uniform sample of "
                              f"{len(sample.labels)} of the {listing.info.num_items} listed images")
        return plan
    # an explicit split (or the demo's): the queries are listed here, the bank too unless it is the training listing
    if source == "demo":
        bank = open_labelled(str(DEMO_DIR / "train.parquet"), cfg, split="train", max_images=max_images)
        queries = open_labelled(str(DEMO_DIR / "test.parquet"), cfg, split="val", label_map=bank.label_map,
                                max_images=max_images)
        return EvalPlan("demo", listing, bank=bank, queries=queries, label="demo test split",
                        split=f"demo's test split ({len(queries)} images)")
    if d.eval_train_source:
        bank = open_labelled(d.eval_train_source, cfg, split="train", max_images=max_images)
    else:
        if not listing.info.has_labels:
            raise EvalDataError(f"train split {d.source!r} is unlabelled, so it cannot be the k-NN memory bank for "
                                f"data.eval_source={source!r}; set data.eval_train_source to a labelled split")
        sample = sample_labels(listing, LABEL_SAMPLE_ROWS, d.seed)
        labelled = np.flatnonzero(sample.labels >= 0)
        bank = _labelled(listing, sample, labelled[round_robin(sample.labels[labelled], max_images)],
                         _label_map(listing, sample.labels), "train")
    queries = open_labelled(resolve_source(source, "test"), cfg, split="val", label_map=bank.label_map,
                            max_images=max_images)
    return EvalPlan("explicit", listing, bank=bank, queries=queries, label=f"split {source}",
                    split=f"split {source} ({len(queries)} images)")


__all__ = ["EvalPlan", "LABEL_SAMPLE_ROWS", "MIN_HOLDOUT", "holdout_size", "plan_evaluation", "sample_labels",
           "stratified_pick", "without_items"]
