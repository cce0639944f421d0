"""Image sources for the Ray Data ingest: an image folder, Parquet files, or the shipped demo data.

Every source becomes a lazy ``ray.data.Dataset`` of raw, *undecoded* rows

    {"bytes": binary, "key": str, "label": int64, "epoch": int64, "position": int64}

``key`` names the image stably across runs (the file path for a folder, ``"<parquet path>#<row>"`` for Parquet), so
that per-image augmentation seeds and bad-input reports can refer to it; ``label`` is -1 when the source has none;
``epoch`` is the row's data epoch and ``position`` its index in that epoch's read order (0 .. rows per epoch - 1; it
depends on the listing, ``data.seed`` and the epoch only, never on the world size): what a checkpoint records to
resume inside an epoch (``pipelines/stream_position.py``).

The driver lists a source once (:func:`list_source`): a folder is listed with ``pyarrow.fs.FileSelector(recursive=
True)`` and a Parquet source only has its footers read, which gives :class:`SourceInfo` (item count, labels, class
names) without touching any image, and a picklable :class:`SourceListing` that the run (every restart) and a sweep
(every trial) reuse. :func:`epoch_stream` turns a listing into one Dataset for many data epochs: its read tasks
(``FOLDER_FILES_PER_UNIT`` images, or a Parquet read unit: a whole row group or a run of consecutive small ones,
read once in ``PARQUET_ROWS_PER_TASK``-row batches) run in epoch order, each epoch in its own order seeded by
``(data.seed, epoch)``: folder images are permuted, Parquet units are permuted and so are the rows within each unit
(up to ``PARQUET_SHUFFLE_MAX_BYTES``), so a one-row-group file is not read in the same order every epoch. The bytes
are decoded later, in the augmenting actors (``pipelines/ingest.py``). Any URI that
``pyarrow.fs.FileSystem.from_uri`` understands works: a local path, ``file://``, ``s3://``, ``gs://``; transient
storage errors are retried (``pipelines/storage.py``).

A stream that resumes from a checkpoint's :class:`~pipelines.stream_position.StreamPosition` starts each data epoch
at the read unit of its watermark and leaves out the positions consumed above it before reading them: a folder
image that is not needed is never fetched, a Parquet unit with nothing needed is never opened (a partly consumed
unit is read, and only its needed rows are emitted).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines import storage

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

    from ibot_ray.config import IBOTConfig
    from pipelines.stream_position import EpochProgress, StreamPosition

log = logging.getLogger(__name__)

#: Folder of the Parquet demo data shipped with the package (``train.parquet``, ``test.parquet``).
DEMO_DIR = Path(__file__).resolve().parent.parent / "ibot_ray" / "demo_data"
#: Fashion-MNIST class names of the demo data, in label order.
DEMO_CLASS_NAMES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                    "ankle_boot")
#: File name extensions (lower case, no dot) that a folder source reads; other files are ignored when listing.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "jpe", "jfif", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm",
                    "pnm")
#: Parquet schema metadata key that may hold a JSON list of class names (label order).
CLASS_NAMES_METADATA_KEY = b"class_names"
#: Parquet read units: consecutive row groups of a file are merged until a unit holds at least this many rows (a row
#: group is never split: each is read exactly once, by one task), and a unit is streamed in batches of this many rows.
PARQUET_ROWS_PER_TASK = 256
#: Read buffer of the streamed Parquet reader (bytes): a read task holds about this much undecoded data per column
#: plus one batch, not the whole row group.
PARQUET_READ_BUFFER = 4 * 2**20
#: A Parquet read unit of at most this many bytes (uncompressed, as its footer says) is read whole and its rows are
#: permuted per data epoch: a file written as one row group (what pandas and pyarrow write below 1Mi rows) is still
#: read in a new order every epoch. A larger unit streams in file order, mixed only by the local shuffle buffer, and
#: the listing warns about it.
PARQUET_SHUFFLE_MAX_BYTES = 256 * 2**20
#: Names Ray's file listing skips at the top of a folder; we skip the same so counts agree exactly.
_SKIPPED_PREFIXES = (".", "_")


class SourceError(ValueError):
    """A data source is missing, empty or malformed; the message names it."""


@dataclass
class SourceInfo:
    """What the driver knows about a source from listing / Parquet metadata alone (no image is read)."""

    uri: str  # the source as given (after resolving "demo")
    format: str  # "folder" or "parquet"
    num_items: int  # number of files (folder) or rows (Parquet); bad images are still counted here
    has_labels: bool
    class_names: Optional[list[str]] = None  # label -> name, when known
    files: list[str] = field(default_factory=list, repr=False)  # Parquet files, or the folder's images (sorted)


# ---- URIs and filesystems ---------------------------------------------------------------------


def resolve_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` of a data source: a local path or any URI pyarrow knows (``file://``, ``s3://``,
    ``gs://``, ...), through :func:`pipelines.storage.resolve`: every operation on a remote source is retried through
    transient errors (listing, footers, the read tasks' reads). A URI that cannot be opened raises SourceError."""
    try:
        return storage.resolve(uri, setting="data.source")
    except storage.StorageConfigError as e:
        raise SourceError(str(e)) from None


def resolve_source(source: str, split: str = "train") -> str:
    """Replace ``"demo"`` by the shipped demo Parquet file of ``split``; other sources are returned unchanged."""
    if source != "demo":
        return source
    path = DEMO_DIR / f"{split}.parquet"
    if not path.exists():
        raise SourceError(
            f"data.source: 'demo' needs the demo data at {path}, which is missing; reinstall the package or point "
            "data.source at an image folder or Parquet files"
        )
    return str(path)


def _has_image_extension(path: str) -> bool:
    return path.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in os.path.basename(path) else False


def _list_files(fs: pafs.FileSystem, root: str) -> list[tuple[str, int]]:
    """All files under ``root`` (recursive), as sorted ``(path, size)``, skipping top-level ``.``/``_`` names."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    base = root.rstrip("/")
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(base):].lstrip("/") if info.path.startswith(base) else info.path
        if rel.startswith(_SKIPPED_PREFIXES):
            continue
        out.append((info.path, info.size))
    return sorted(out)


def detect_format(uri: str, fmt: str = "auto") -> str:
    """``"folder"`` or ``"parquet"`` for a source URI (``fmt`` other than ``"auto"`` is returned as is)."""
    return _detect(uri, fmt)[0]


def _detect(uri: str, fmt: str = "auto") -> tuple[str, Optional[list[tuple[str, int]]]]:
    """(format, the folder's recursive listing or None): a folder is listed once, here, and the listing reused."""
    if fmt != "auto":
        if fmt not in ("folder", "parquet"):
            raise SourceError(f"data.format: must be auto, folder or parquet, got {fmt!r}")
        return fmt, None
    fs, path = resolve_uri(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"data.source: {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        if path.lower().endswith(".parquet"):
            return "parquet", None
        raise SourceError(f"data.source: {uri!r} is a single file that is not .parquet; give a folder of images")
    files = _list_files(fs, path)
    n_parquet = sum(p.lower().endswith(".parquet") for p, _ in files)
    n_images = sum(_has_image_extension(p) for p, _ in files)
    if n_parquet and not n_images:
        return "parquet", files
    if n_images:
        return "folder", files
    raise SourceError(f"data.source: {uri!r} holds neither images ({', '.join(IMAGE_EXTENSIONS)}) nor .parquet files")


# ---- folder source -----------------------------------------------------------------------------


def list_image_folder(uri: str, files: Optional[list[tuple[str, int]]] = None
                      ) -> tuple[SourceInfo, str, pafs.FileSystem]:
    """List an image folder: flat (no labels) or ImageFolder (``root/<class>/.../img``, sorted class names -> 0..C-1).

    The folder counts as ImageFolder when every image sits below a first-level subfolder; images directly in the
    root make it flat (labels -1). Only names with an image extension are listed; nothing is opened. ``files``: the
    folder's listing when the caller already has it (``SourceInfo.files`` then holds the image paths, sorted).
    """
    fs, root = resolve_uri(uri)
    if files is None:
        info = fs.get_file_info(root)
        if info.type != pafs.FileType.Directory:
            raise SourceError(f"data.source: {uri!r} is not a folder")
        files = _list_files(fs, root)
    images = [p for p, _ in files if _has_image_extension(p)]
    if not images:
        raise SourceError(f"data.source: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {uri!r}")
    rels = [p[len(root):].lstrip("/") for p in images]
    nested = all("/" in r for r in rels)
    class_names = sorted({r.split("/", 1)[0] for r in rels}) if nested else None
    return (
        SourceInfo(uri=uri, format="folder", num_items=len(images), has_labels=nested, class_names=class_names,
                   files=images),
        root,
        fs,
    )


def folder_labels(paths: list[str], root: str, class_to_idx: Optional[dict[str, int]]) -> np.ndarray:
    """Labels of folder images from their first-level class subfolder (-1 without classes)."""
    if class_to_idx is None:
        return np.full(len(paths), -1, dtype=np.int64)
    base = root.rstrip("/")
    return np.array([class_to_idx.get(p[len(base):].lstrip("/").split("/", 1)[0], -1) for p in paths],
                    dtype=np.int64)


def _read_whole(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


# ---- Parquet source ----------------------------------------------------------------------------


def _parquet_files(uri: str, listed: Optional[list[tuple[str, int]]] = None) -> tuple[pafs.FileSystem, list[str]]:
    fs, path = resolve_uri(uri)
    if listed is None:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"data.source: {uri!r} does not exist")
        if info.type == pafs.FileType.File:
            return fs, [path]
        listed = _list_files(fs, path)
    files = [p for p, _ in listed if p.lower().endswith(".parquet")]
    if not files:
        raise SourceError(f"data.source: no .parquet files under {uri!r}")
    return fs, files


def _read_footer(fs: pafs.FileSystem, path: str) -> tuple[pq.FileMetaData, pa.Schema]:
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        return pf.metadata, pf.schema_arrow


def _string_label_names(fs: pafs.FileSystem, files: list[str], label_column: str) -> list[str]:
    """Sorted distinct values of a string label column (reads only that column, never the images)."""

    def distinct(path: str) -> set:
        with fs.open_input_file(path) as f:
            col = pq.ParquetFile(f).read(columns=[label_column]).column(label_column)
        return set(col.unique().to_pylist()) - {None}

    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        return sorted(set().union(*pool.map(distinct, files)))


def list_parquet(
    uri: str, image_column: str, label_column: Optional[str], files: Optional[list[tuple[str, int]]] = None
) -> tuple[SourceInfo, list[dict], Any, Optional[dict[str, int]]]:
    """Read only the Parquet footers: row counts, the columns present and the read units.

    A read unit is a run of consecutive row groups of one file, ``{"path", "row_group" (first), "num_row_groups",
    "first_row", "length" (rows), "bytes" (uncompressed)}``: row groups are merged until a unit holds
    ``PARQUET_ROWS_PER_TASK`` rows, and a large row group is a unit of its own, so every byte of the file is read once
    per epoch. A unit over ``PARQUET_SHUFFLE_MAX_BYTES`` is logged as a warning: its rows cannot be permuted per epoch.

    Every file must have ``image_column`` (binary); labels are used only when *every* file has ``label_column``.
    Integer labels are used as they are (class names from the ``class_names`` schema metadata, if any); string
    labels become sorted class names -> 0..C-1 (the last return value maps them; only this column is read).
    ``files``: the folder's listing when the caller already has it.
    """
    fs, files = _parquet_files(uri, files)
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        footers = list(pool.map(lambda p: _read_footer(fs, p), files))
    units: list[dict] = []
    has_labels = bool(label_column)
    string_labels = False
    class_names = None
    total = 0
    for path, (meta, schema) in zip(files, footers):
        if image_column not in schema.names:
            raise SourceError(
                f"data.image_column: {path} has no column {image_column!r} (columns: {', '.join(schema.names)})"
            )
        t = schema.field(image_column).type
        if not (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
            raise SourceError(f"data.image_column: column {image_column!r} of {path} is {t}, not binary image bytes")
        if not label_column or label_column not in schema.names:
            has_labels = False
        else:
            lt = schema.field(label_column).type
            if pa.types.is_string(lt) or pa.types.is_large_string(lt):
                string_labels = True
            elif not (pa.types.is_integer(lt) or pa.types.is_null(lt)):
                raise SourceError(f"data.label_column: column {label_column!r} of {path} is {lt}, not integer or "
                                  "string labels")
        if class_names is None and schema.metadata and CLASS_NAMES_METADATA_KEY in schema.metadata:
            class_names = list(json.loads(schema.metadata[CLASS_NAMES_METADATA_KEY]))
        offset = 0
        unit = None
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            if unit is None:
                unit = {"path": path, "row_group": rg, "num_row_groups": 0, "first_row": offset, "length": 0,
                        "bytes": 0}
            unit["num_row_groups"] += 1
            unit["length"] += n
            unit["bytes"] += meta.row_group(rg).total_byte_size
            offset += n
            if unit["length"] >= PARQUET_ROWS_PER_TASK:
                units.append(unit)
                unit = None
        if unit is not None:
            units.append(unit)
        total += meta.num_rows
    if total == 0:
        raise SourceError(f"data.source: the Parquet files under {uri!r} hold no rows")
    big = [u for u in units if u["bytes"] > PARQUET_SHUFFLE_MAX_BYTES]
    if big:
        log.warning(
            "%d Parquet row group(s) under %r are over %d MB each (the first: %s, %d rows, %d MB): their rows are read "
            "in file order every epoch, mixed only by data.local_shuffle_buffer_size; write the files with smaller "
            "row groups (pyarrow.parquet.write_table(..., row_group_size=N)) for a full shuffle every epoch",
            len(big), uri, PARQUET_SHUFFLE_MAX_BYTES >> 20, big[0]["path"], big[0]["length"], big[0]["bytes"] >> 20)
    class_to_idx = None
    if not has_labels:
        class_names = None
    elif string_labels:
        class_names = _string_label_names(fs, files, label_column)
        class_to_idx = {c: i for i, c in enumerate(class_names)}
    info = SourceInfo(uri=uri, format="parquet", num_items=total, has_labels=has_labels, class_names=class_names,
                      files=files)
    return info, units, fs, class_to_idx


def _read_parquet_unit(
    unit: dict,
    fs: pafs.FileSystem,
    image_column: str,
    label_column: Optional[str],
    class_to_idx: Optional[dict[str, int]] = None,
    shuffle_seed: Optional[tuple[int, ...]] = None,
    max_shuffle_bytes: int = PARQUET_SHUFFLE_MAX_BYTES,
    first_position: int = 0,
    needed: Optional[np.ndarray] = None,
) -> Iterator[pa.Table]:
    """One read unit (a run of row groups) -> ``{bytes, key, label, position}`` tables; runs in Ray tasks, never on
    the driver.

    The unit's row groups are streamed once (``iter_batches`` without pre-buffering, ``PARQUET_READ_BUFFER``-byte
    reads). With ``shuffle_seed`` (the trainer's ``(data.seed, epoch, unit)``) a unit of at most
    ``max_shuffle_bytes`` is gathered and yielded as ``PARQUET_ROWS_PER_TASK``-row tables in a permutation seeded by
    it; otherwise, and for a larger unit, the tables come in file order, so a task never holds a large row group.
    The k-th row the unit emits (in that order) has position ``first_position + k``; ``needed`` (a boolean mask over
    the unit's emitted rows, from a resumed stream) leaves out the rows already consumed."""
    columns = [image_column] + ([label_column] if label_column else [])
    path, rg, n_rg = str(unit["path"]), int(unit["row_group"]), int(unit["num_row_groups"])
    permute = shuffle_seed is not None and int(unit["bytes"]) <= max_shuffle_bytes
    excluded = np.asarray(unit.get("excluded", ()), np.int64)  # file rows held out of training (eval_split.py)
    gathered = []

    def emit(table: pa.Table, emitted: np.ndarray) -> Optional[pa.Table]:
        """``table`` (rows emitted ``emitted``, in order) with its position column, without the unneeded rows."""
        if needed is not None:
            keep = needed[emitted]
            if not keep.all():
                table, emitted = table.filter(pa.array(keep)), emitted[keep]
        if table.num_rows == 0:
            return None
        return table.append_column(POSITION_COLUMN, pa.array(first_position + emitted, pa.int64()))

    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=PARQUET_READ_BUFFER)
        row, kept = int(unit["first_row"]), 0
        for batch in pf.iter_batches(batch_size=PARQUET_ROWS_PER_TASK, row_groups=range(rg, rg + n_rg),
                                     columns=columns, use_threads=False):
            table = _parquet_rows(pa.Table.from_batches([batch]), path, row, image_column, label_column, class_to_idx)
            if len(excluded):
                table = table.filter(pa.array(~np.isin(np.arange(row, row + batch.num_rows), excluded)))
            row += batch.num_rows
            done, kept = kept, kept + table.num_rows  # emitted before this batch, after it
            if permute:
                gathered.append(table)
            elif (out := emit(table, np.arange(done, done + table.num_rows))) is not None:
                yield out
    if gathered:
        table = pa.concat_tables(gathered)
        order = np.random.default_rng(list(shuffle_seed)).permutation(table.num_rows)
        emitted = np.arange(table.num_rows) if needed is None else np.flatnonzero(needed)
        for start in range(0, len(emitted), PARQUET_ROWS_PER_TASK):
            chunk = emitted[start:start + PARQUET_ROWS_PER_TASK]
            yield table.take(order[chunk]).append_column(POSITION_COLUMN, pa.array(first_position + chunk, pa.int64()))


def parquet_unit_labels(listing: SourceListing, units: Iterable[int]) -> Iterator[np.ndarray]:
    """The int64 labels of read units ``units`` of a Parquet listing, one array per unit in file-row order (string
    labels through the listing's class map; null, or a source without labels: -1). Reads only the label column."""
    for u in units:
        unit = listing.units[int(u)]
        n = int(unit["length"])
        if not listing.label_column:
            yield np.full(n, -1, np.int64)
            continue
        rg = int(unit["row_group"])
        with listing.fs.open_input_file(str(unit["path"])) as f:
            col = pq.ParquetFile(f).read_row_groups(range(rg, rg + int(unit["num_row_groups"])),
                                                    columns=[listing.label_column]).column(0)
        if listing.class_to_idx is not None:
            index = listing.class_to_idx
            yield np.fromiter((index.get(v, -1) if v is not None else -1 for v in col.to_pylist()), np.int64, n)
        else:
            yield np.asarray(col.cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False), np.int64)


def _parquet_rows(table: pa.Table, path: str, first: int, image_column: str, label_column: Optional[str],
                  class_to_idx: Optional[dict[str, int]]) -> pa.Table:
    """Rows ``first..`` of a Parquet file -> ``{bytes, key = "<path>#<row>", label}``."""
    n = table.num_rows
    if label_column and class_to_idx is not None:
        lab = pa.array([class_to_idx.get(v, -1) for v in table.column(label_column).to_pylist()], pa.int64())
    elif label_column:
        lab = table.column(label_column).cast(pa.int64()).fill_null(-1)
    else:
        lab = pa.array(np.full(n, -1, dtype=np.int64))
    keys = pa.array([f"{path}#{first + i}" for i in range(n)], pa.string())
    image = table.column(image_column)
    if pa.types.is_large_binary(image.type):
        image = image.cast(pa.binary())
    return pa.table({"bytes": image, "key": keys, "label": lab})




# ---- the listing and the epoch stream ------------------------------------------------------------

#: Folder images per read unit; a unit's files are fetched by ``FOLDER_READ_THREADS`` threads (object stores answer
#: each request in tens of milliseconds, so one request at a time would starve the augmenting actors).
FOLDER_FILES_PER_UNIT = 64
FOLDER_READ_THREADS = 8
#: A read task reads about this many rows (whole read units: at least one), however long the run: a lost node re-runs
#: at most that much reading, and with ``preserve_order`` a finished task's output waits at most for the tasks before
#: it, each ~100 MB of undecoded images at ~100 kB each (1.6M images per task at 100M rows x 800 epochs before).
STREAM_TASK_ROWS = 1024
#: The task ids of a stream come from ``ray.data.range`` in at most this many blocks (Ray builds one read task per
#: block up front); above it, a streaming repartition cuts them into one-id blocks, so that every read task still
#: reads a single ``STREAM_TASK_ROWS`` task, created as the stream gets to it.
MAX_ID_BLOCKS = 10_000
#: Column holding each row's data epoch (from the source to the training batch).
EPOCH_COLUMN = "epoch"
#: Column holding each row's position in its data epoch's read order (module doc).
POSITION_COLUMN = "position"


@dataclass
class SourceListing:
    """A source, listed once on the driver: its :class:`SourceInfo` and what every data epoch reads.

    Picklable (paths or Parquet read units, a pyarrow filesystem): the one listing of a run serves the dataset of
    every worker-group start (first start, restarts, resizes), and a sweep lists once for all its trials."""

    info: SourceInfo
    fs: pafs.FileSystem
    root: Optional[str] = None  # folder root
    paths: list[str] = field(default_factory=list, repr=False)  # folder: image paths, sorted
    units: list[dict] = field(default_factory=list, repr=False)  # Parquet: read units (see list_parquet)
    class_to_idx: Optional[dict[str, int]] = None  # folder class names / Parquet string labels -> index
    image_column: str = "image"
    label_column: Optional[str] = None  # None: no labels (-1)
    _unit_rows: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    @property
    def num_units(self) -> int:
        """Read units per data epoch (folder: chunks of ``FOLDER_FILES_PER_UNIT`` images)."""
        if self.info.format == "parquet":
            return len(self.units)
        return math.ceil(len(self.paths) / FOLDER_FILES_PER_UNIT)

    def unit_rows(self) -> np.ndarray:
        """Rows each read unit emits per data epoch (Parquet: in listing order; folder: its chunks in read order)."""
        if self._unit_rows is None:
            if self.info.format == "parquet":
                # a unit's rows held out of training (pipelines/eval_split.py) are never emitted
                rows = np.array([int(u["length"]) - len(u.get("excluded", ())) for u in self.units], np.int64)
            else:
                rows = np.full(self.num_units, FOLDER_FILES_PER_UNIT, np.int64)
                rows[-1] = len(self.paths) - FOLDER_FILES_PER_UNIT * (self.num_units - 1)
            self._unit_rows = rows
        return self._unit_rows

    @property
    def positions_per_epoch(self) -> int:
        """Rows a data epoch emits: its positions are ``0 .. positions_per_epoch - 1``."""
        return int(self.unit_rows().sum())

    def unit_bounds(self, seed: Optional[int], epoch: int) -> np.ndarray:
        """``num_units + 1`` offsets: the k-th unit of data epoch ``epoch``'s read order emits positions
        ``bounds[k] .. bounds[k + 1] - 1``."""
        rows = self.unit_rows()
        if self.info.format == "parquet":
            rows = rows[epoch_order(len(rows), seed, epoch)]
        return np.concatenate([[0], np.cumsum(rows)])


def list_source(cfg: IBOTConfig, source: Optional[str] = None, *, split: str = "train") -> SourceListing:
    """List a source (default ``cfg.data.source``) once: a folder's files or the Parquet footers, no image."""
    d = cfg.data
    raw = source if source is not None else d.source
    if not raw:
        raise SourceError("data.source: must not be empty")
    uri = resolve_source(raw, split)
    fmt, files = ("parquet", None) if raw == "demo" else _detect(uri, d.format)
    if fmt == "folder":
        info, root, fs = list_image_folder(uri, files)
        class_to_idx = {c: i for i, c in enumerate(info.class_names)} if info.class_names else None
        return SourceListing(info=info, fs=fs, root=root, paths=list(info.files), class_to_idx=class_to_idx)
    info, units, fs, class_to_idx = list_parquet(uri, d.image_column, d.label_column or None, files)
    if raw == "demo" and info.class_names is None and info.has_labels:
        info.class_names = list(DEMO_CLASS_NAMES)
    return SourceListing(info=info, fs=fs, units=units, class_to_idx=class_to_idx, image_column=d.image_column,
                         label_column=d.label_column if info.has_labels else None)


def describe_source(cfg: IBOTConfig, source: Optional[str] = None, *, split: str = "train") -> SourceInfo:
    """:class:`SourceInfo` of a source (default ``cfg.data.source``) from listing / footers only."""
    return list_source(cfg, source, split=split).info


def sample_image_sides(listing: SourceListing, n: int = 32, seed: int = 0) -> list[int]:
    """The shorter sides of up to ``n`` images of the listing, drawn uniformly (seeded), from their headers only
    (folder: the file is read, not decoded; Parquet: the rows of one or two read units). Unreadable ones are left
    out."""
    from PIL import Image, UnidentifiedImageError

    rng = np.random.default_rng([int(seed), 0x73697A65])
    blobs: list[bytes] = []
    if listing.info.format == "folder":
        picks = rng.choice(len(listing.paths), min(n, len(listing.paths)), replace=False)
        with ThreadPoolExecutor(max_workers=FOLDER_READ_THREADS) as pool:
            blobs = list(pool.map(lambda i: _read_whole(listing.fs, listing.paths[int(i)]), picks))
    else:
        for u in rng.permutation(len(listing.units)):
            for table in _read_parquet_unit(listing.units[int(u)], listing.fs, listing.image_column, None):
                blobs += table.column("bytes").to_pylist()[: n - len(blobs)]
                if len(blobs) >= n:
                    break
            if len(blobs) >= n:
                break
    sides = []
    for b in blobs:
        try:
            sides.append(min(Image.open(io.BytesIO(b)).size))
        except (UnidentifiedImageError, OSError, ValueError):
            continue
    return sides


@lru_cache(maxsize=4)
def epoch_order(n: int, seed: Optional[int], epoch: int) -> np.ndarray:
    """The read order of ``n`` items (folder images, Parquet units) in data epoch ``epoch``: a permutation seeded by
    ``(seed, epoch)``, so every epoch has its own order and a restart at epoch E reads E's order again; identity
    without a seed. Cached: every read task of an epoch in a worker process shares one permutation."""
    if seed is None:
        out = np.arange(n)
    else:
        out = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
    out.flags.writeable = False
    return out


def _read_unit(listing: SourceListing, fs: pafs.FileSystem, seed: Optional[int], epoch: int, k: int,
               bounds: np.ndarray, needed: Optional[np.ndarray] = None) -> Iterator[pa.Table]:
    """The ``k``-th read unit of data epoch ``epoch`` -> ``{bytes, key, label, position}`` tables. ``bounds``:
    :meth:`SourceListing.unit_bounds` of the epoch; ``needed``: which of the unit's positions to emit (None: all),
    the others are not read (folder) or not emitted (Parquet)."""
    first, last = int(bounds[k]), int(bounds[k + 1])
    if listing.info.format == "parquet":
        i = int(epoch_order(len(listing.units), seed, epoch)[k])
        yield from _read_parquet_unit(listing.units[i], fs, listing.image_column, listing.label_column,
                                      listing.class_to_idx, None if seed is None else (int(seed), int(epoch), i),
                                      first_position=first, needed=needed)
        return
    positions = np.arange(first, last)
    if needed is not None:
        positions = positions[needed]
    order = epoch_order(len(listing.paths), seed, epoch)
    paths = [listing.paths[i] for i in order[positions]]
    with ThreadPoolExecutor(max_workers=min(FOLDER_READ_THREADS, len(paths))) as pool:
        blobs = list(pool.map(lambda p: _read_whole(fs, p), paths))
    yield pa.table({"bytes": pa.array(blobs, pa.binary()), "key": pa.array(paths, pa.string()),
                    "label": folder_labels(paths, listing.root or "", listing.class_to_idx),
                    POSITION_COLUMN: pa.array(positions, pa.int64())})


@dataclass(frozen=True)
class StreamPlan:
    """Which read units each task of a stream reads: data epochs ``start_epoch ..`` in order, each from its
    ``first_units`` entry (the leading epochs of a resumed stream start at their watermark's unit; later ones at
    0), ``units_per_task`` consecutive units per task (the last task of an epoch may read fewer)."""

    start_epoch: int
    num_epochs: int
    num_units: int
    units_per_task: int
    first_units: tuple[int, ...] = ()

    def _tasks_in(self, first_unit: int) -> int:
        return math.ceil(max(0, self.num_units - first_unit) / self.units_per_task)

    @property
    def _leading(self) -> np.ndarray:  # cumulative task counts of the leading epochs
        return np.cumsum([0] + [self._tasks_in(u) for u in self.first_units[:self.num_epochs]])

    @property
    def num_tasks(self) -> int:
        lead = len(self.first_units[:self.num_epochs])
        return int(self._leading[-1]) + (self.num_epochs - lead) * self._tasks_in(0)

    def task(self, t: int) -> tuple[int, int, int]:
        """``(data epoch, first unit, end unit)`` of task ``t``."""
        cum = self._leading
        if t < cum[-1]:
            i = int(np.searchsorted(cum, t, side="right")) - 1
            first = self.first_units[i] + (t - int(cum[i])) * self.units_per_task
            return self.start_epoch + i, first, min(first + self.units_per_task, self.num_units)
        per_epoch = self._tasks_in(0)
        i, j = divmod(t - int(cum[-1]), per_epoch)
        first = j * self.units_per_task
        return self.start_epoch + len(cum) - 1 + i, first, min(first + self.units_per_task, self.num_units)


def _read_stream_tasks(batch: dict[str, np.ndarray], listing: SourceListing, fs: pafs.FileSystem,
                       seed: Optional[int], plan: StreamPlan,
                       resume: dict[int, EpochProgress]) -> Iterator[pa.Table]:
    """Stream task ids -> raw rows of their data epoch, each row tagged with its epoch and position (runs in Ray
    tasks). Units of a resumed epoch that hold no needed position are skipped without a read."""
    for t in batch["id"]:
        epoch, first, end = plan.task(int(t))
        bounds = listing.unit_bounds(seed, epoch)
        progress = resume.get(epoch)
        for k in range(first, end):
            needed = None if progress is None else progress.needed(int(bounds[k]), int(bounds[k + 1]))
            if needed is not None and not needed.any():
                continue
            for table in _read_unit(listing, fs, seed, epoch, k, bounds, needed):
                yield table.append_column(EPOCH_COLUMN, pa.array(np.full(table.num_rows, epoch, np.int64)))


def stream_plan(listing: SourceListing, seed: Optional[int], start_epoch: int, num_epochs: int,
                resume: Optional[StreamPosition] = None) -> tuple[StreamPlan, dict[int, EpochProgress]]:
    """The :class:`StreamPlan` of a stream, and the progress of its epochs that ``resume`` has started."""
    units_per_task = max(1, STREAM_TASK_ROWS * listing.num_units // max(1, listing.positions_per_epoch))
    progress = {e: p for e, p in (resume.epochs if resume else {}).items()
                if start_epoch <= e < start_epoch + num_epochs}
    first_units = tuple(
        int(np.searchsorted(listing.unit_bounds(seed, e), progress[e].watermark, side="right")) - 1
        if e in progress else 0
        for e in range(start_epoch, max(progress, default=start_epoch - 1) + 1))
    return StreamPlan(int(start_epoch), int(num_epochs), listing.num_units, units_per_task, first_units), progress


def epoch_stream(listing: SourceListing, *, seed: Optional[int], start_epoch: int = 0, num_epochs: int = 1,
                 resume: Optional[StreamPosition] = None) -> ray.data.Dataset:
    """One lazy Dataset for data epochs ``start_epoch .. start_epoch + num_epochs - 1``, in order: raw rows
    ``{bytes, key, label, position, epoch}``, every item once per epoch, each epoch in its own :func:`epoch_order`.

    A single execution streams every epoch: the consumer sees epoch boundaries only in the ``epoch`` column (a few
    rows of adjacent epochs may interleave there), and nothing downstream (the augmenting actor pool) restarts.
    Each read task reads about ``STREAM_TASK_ROWS`` rows. ``resume`` (a checkpoint's stream position): the epochs it
    has started begin at their watermark's read unit and leave out what it marks consumed (module doc)."""
    import ray.data

    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    plan, progress = stream_plan(listing, seed, start_epoch, num_epochs, resume)
    tasks = plan.num_tasks
    ids = ray.data.range(tasks, override_num_blocks=min(tasks, MAX_ID_BLOCKS))
    if tasks > MAX_ID_BLOCKS:
        ids = ids.repartition(target_num_rows_per_block=1)  # streaming, and not fused with the read below
    # listing.fs comes from resolve_uri: on remote storage every read is retried through transient errors
    return ids.map_batches(
        _read_stream_tasks, batch_size=1, batch_format="numpy",
        fn_kwargs={"listing": listing, "fs": listing.fs, "seed": seed, "plan": plan, "resume": progress},
    )


def build_source_dataset(
    cfg: IBOTConfig, source: Optional[str] = None, *, split: str = "train", shuffle_seed: Optional[int] = None,
    start_epoch: int = 0, num_epochs: int = 1, listing: Optional[SourceListing] = None,
    resume: Optional[StreamPosition] = None,
) -> tuple[ray.data.Dataset, SourceInfo]:
    """A lazy Dataset of raw ``{"bytes", "key", "label", "position", "epoch"}`` rows and the :class:`SourceInfo` of
    the source.

    ``source`` overrides ``cfg.data.source`` (e.g. for the eval split; ``"demo"`` picks ``split``); ``listing``
    skips the listing. With ``shuffle_seed`` the file (folder) or read-unit (Parquet) order of every data epoch
    follows ``(shuffle_seed, epoch)``: see :func:`epoch_stream` (and for ``resume``).
    """
    listing = listing if listing is not None else list_source(cfg, source, split=split)
    return epoch_stream(listing, seed=shuffle_seed, start_epoch=start_epoch, num_epochs=num_epochs,
                        resume=resume), listing.info


__all__ = [
    "DEMO_CLASS_NAMES",
    "DEMO_DIR",
    "EPOCH_COLUMN",
    "IMAGE_EXTENSIONS",
    "POSITION_COLUMN",
    "SourceError",
    "SourceInfo",
    "SourceListing",
    "StreamPlan",
    "build_source_dataset",
    "describe_source",
    "detect_format",
    "epoch_order",
    "epoch_stream",
    "list_image_folder",
    "list_parquet",
    "list_source",
    "resolve_source",
    "resolve_uri",
    "sample_image_sides",
]
