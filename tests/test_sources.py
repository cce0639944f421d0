"""Sources: image folders (flat and ImageFolder), Parquet (with and without labels), file:// URIs and the demo data.

Every expectation is computed here from the files the test wrote: the exact key set, the raw bytes of every row,
the label from the class folder / label column, the counts known before any image is read.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import BAD_KINDS, GOOD_KINDS, write_images, write_parquet

from ibot_ray.config import load_config
from pipelines import sources
from pipelines.sources import SourceError, build_source_dataset, describe_source, detect_format


@pytest.fixture
def cfg():
    return load_config("demo")


def _rows(ds):
    return {r["key"]: r for r in ds.take_all()}


# ---- listing only (no Ray) -----------------------------------------------------------------------


def test_folder_listing_counts_labels_and_skips(tmp_path, cfg):
    write_images(tmp_path / "d", 7, classes=["zebra", "ant", "moth"], bad=["text", "empty"])
    (tmp_path / "d" / "README.txt").write_text("not an image")  # no image extension: not listed
    (tmp_path / "d" / "_tmp").mkdir()
    (tmp_path / "d" / "_tmp" / "x.png").write_bytes(b"")  # top-level "_" names are skipped (as Ray skips them)
    (tmp_path / "d" / ".cache.jpg").write_bytes(b"")
    info = describe_source(cfg, str(tmp_path / "d"))
    assert info.format == "folder"
    assert info.num_items == 7 + 2
    assert info.has_labels and info.class_names == ["ant", "moth", "zebra"]


def test_flat_folder_has_no_labels(tmp_path, cfg):
    write_images(tmp_path / "f", 3)
    info = describe_source(cfg, str(tmp_path / "f"))
    assert (info.num_items, info.has_labels, info.class_names) == (3, False, None)


def test_parquet_listing_reads_only_metadata(tmp_path, cfg):
    write_parquet(tmp_path / "p" / "a.parquet", 5, row_group_size=2)
    write_parquet(tmp_path / "p" / "b.parquet", 4, bad=["corrupt"])
    (tmp_path / "p" / "notes.txt").write_text("ignored")
    assert detect_format(str(tmp_path / "p")) == "parquet"
    info = describe_source(cfg, str(tmp_path / "p"))
    assert (info.format, info.num_items, info.has_labels) == ("parquet", 10, True)
    info = describe_source(load_config("demo", ["data.label_column="]), str(tmp_path / "p"))
    assert not info.has_labels


def test_demo_source_and_missing_demo(monkeypatch, cfg, tmp_path):
    info = describe_source(cfg, "demo")
    assert info.format == "parquet" and info.has_labels and info.num_items == 4000
    assert info.class_names is not None and len(info.class_names) == 10
    assert describe_source(cfg, "demo", split="test").num_items == 1000
    monkeypatch.setattr(sources, "DEMO_DIR", tmp_path / "nowhere")
    with pytest.raises(SourceError, match="demo"):
        describe_source(cfg, "demo")


def test_bad_sources_raise_clear_errors(tmp_path, cfg):
    with pytest.raises(SourceError, match="does not exist"):
        describe_source(cfg, str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="neither images"):
        describe_source(cfg, str(tmp_path / "empty"))
    write_parquet(tmp_path / "q.parquet", 2, image_column="img")
    with pytest.raises(SourceError, match="'image'"):
        describe_source(cfg, str(tmp_path / "q.parquet"))
    with pytest.raises(SourceError, match="format"):
        detect_format(str(tmp_path), "csv")


# ---- reading bytes in Ray ------------------------------------------------------------------------


def test_image_folder_rows_bytes_and_labels(ray_cluster, tmp_path, cfg):
    kinds = list(GOOD_KINDS)
    w = write_images(tmp_path / "imgs", len(kinds), classes=["b", "a"], bad=list(BAD_KINDS))
    ds, info = build_source_dataset(cfg, str(tmp_path / "imgs"), shuffle_seed=3)
    rows = _rows(ds)
    files = w["good"] + w["bad"]
    assert set(rows) == set(files) and info.num_items == len(files) == len(rows)
    for path in files:
        assert rows[path]["bytes"] == Path(path).read_bytes()
        expected = ["a", "b"].index(Path(path).parent.name)
        assert rows[path]["label"] == expected == w["labels"][path]


def test_flat_folder_via_file_uri(ray_cluster, tmp_path, cfg):
    w = write_images(tmp_path / "flat", 4, bad=["empty"])
    ds, info = build_source_dataset(cfg, (tmp_path / "flat").as_uri())
    rows = _rows(ds)
    assert set(rows) == set(w["good"] + w["bad"])
    assert all(r["label"] == -1 for r in rows.values()) and not info.has_labels
    assert rows[w["bad"][0]]["bytes"] == b""


def test_parquet_rows_keys_bytes_labels(ray_cluster, tmp_path, cfg):
    import pyarrow.parquet as pq

    pa_path = tmp_path / "pq" / "part-0.parquet"
    pb_path = tmp_path / "pq" / "part-1.parquet"
    a = write_parquet(pa_path, 5, row_group_size=2, bad=["truncated"])
    b = write_parquet(pb_path, 3, seed=1)
    ds, info = build_source_dataset(cfg, (tmp_path / "pq").as_uri(), shuffle_seed=0)
    rows = _rows(ds)
    assert info.num_items == 9 and info.has_labels
    for path, written in ((pa_path, a), (pb_path, b)):
        table = pq.read_table(path)
        for i in range(table.num_rows):
            r = rows[f"{path}#{i}"]
            assert r["bytes"] == table.column("image")[i].as_py()
            assert r["label"] == written["labels"][i] == i % 3
    assert len(rows) == 9


def test_parquet_without_label_column(ray_cluster, tmp_path, cfg):
    write_parquet(tmp_path / "nl.parquet", 3, with_label=False)
    ds, info = build_source_dataset(cfg, str(tmp_path / "nl.parquet"))
    rows = _rows(ds)
    assert not info.has_labels and info.class_names is None
    assert sorted(rows) == [f"{tmp_path / 'nl.parquet'}#{i}" for i in range(3)]
    assert {r["label"] for r in rows.values()} == {-1}


def test_file_order_follows_the_data_epoch(ray_cluster, tmp_path, cfg):
    """One execution streams several data epochs, each in its own order seeded by (seed, epoch); a stream started at
    epoch 1 (a restart from a checkpoint of data epoch 1) reads epoch 1's order, not epoch 0's prefix again."""
    write_images(tmp_path / "many", 24, kinds=["png"])
    ds, _ = build_source_dataset(cfg, str(tmp_path / "many"), shuffle_seed=5, num_epochs=2)
    rows = ds.select_columns(["key", "epoch"]).take_all()
    order = {e: [r["key"] for r in rows if r["epoch"] == e] for e in (0, 1)}
    assert len(rows) == 48 and sorted(order[0]) == sorted(order[1]) and len(set(order[0])) == 24
    assert order[0] != order[1]  # 24 files: the same order twice has probability 1/24!
    restart, _ = build_source_dataset(cfg, str(tmp_path / "many"), shuffle_seed=5, start_epoch=1)
    assert [r["key"] for r in restart.select_columns(["key"]).take_all()] == order[1]


def test_one_row_group_parquet_is_read_in_a_new_order_every_epoch(ray_cluster, tmp_path, cfg):
    """A file written as one row group (what pyarrow and pandas write below 1Mi rows) is one read unit; its rows are
    permuted per data epoch, seeded by (seed, epoch, unit), so batches are not the same neighbours every epoch, and a
    restart at epoch 1 reads epoch 1's order again."""
    path = tmp_path / "one_group.parquet"
    write_parquet(path, 40)

    def file_rows(ds, epoch=None):  # the file row numbers ("<path>#<row>" keys) in read order
        rows = ds.select_columns(["key", "epoch"]).take_all()
        return [int(r["key"].rsplit("#", 1)[1]) for r in rows if epoch is None or r["epoch"] == epoch]

    ds, info = build_source_dataset(cfg, str(path), shuffle_seed=5, num_epochs=2)
    order = {e: file_rows(ds, e) for e in (0, 1)}
    assert info.num_items == 40 and sorted(order[0]) == sorted(order[1]) == list(range(40))
    assert order[0] != list(range(40)) and order[1] != list(range(40)) and order[0] != order[1]
    assert file_rows(build_source_dataset(cfg, str(path), shuffle_seed=5, start_epoch=1)[0]) == order[1]
    assert file_rows(build_source_dataset(cfg, str(path))[0]) == list(range(40))  # no seed (evaluation): file order


def test_parquet_unit_over_the_shuffle_limit_streams_in_file_order_and_warns(tmp_path, monkeypatch, caplog):
    """A read unit larger than PARQUET_SHUFFLE_MAX_BYTES is not gathered in memory: it streams in file order, and
    the listing says which file and how to write it instead."""
    path = tmp_path / "big_group.parquet"
    write_parquet(path, 600)  # 600 rows: three 256-row batches when streamed
    monkeypatch.setattr(sources, "PARQUET_SHUFFLE_MAX_BYTES", 1000)
    with caplog.at_level("WARNING", logger="pipelines.sources"):
        _, units, fs, _ = sources.list_parquet(str(path), "image", "label")
    assert len(units) == 1 and units[0]["bytes"] > 1000
    assert "big_group.parquet" in caplog.text and "row_group_size" in caplog.text

    def keys(**kw):
        tables = list(sources._read_parquet_unit(units[0], fs, "image", "label", None, (5, 0, 0), **kw))
        return [int(k.rsplit("#", 1)[1]) for t in tables for k in t.column("key").to_pylist()], len(tables)

    assert keys(max_shuffle_bytes=1000) == (list(range(600)), 3)
    permuted, n_tables = keys(max_shuffle_bytes=units[0]["bytes"])
    assert sorted(permuted) == list(range(600)) and permuted != list(range(600)) and n_tables == 3


def test_source_is_listed_once(tmp_path, cfg, monkeypatch):
    """The driver lists a folder once (format detection and the listing share it), and the listing is reusable."""
    import pickle

    write_images(tmp_path / "d", 5, classes=["a", "b"])
    calls = []
    real = sources._list_files
    monkeypatch.setattr(sources, "_list_files", lambda fs, root: calls.append(root) or real(fs, root))
    info = describe_source(cfg, str(tmp_path / "d"))
    assert len(calls) == 1 and info.num_items == 5
    listing = sources.list_source(cfg, str(tmp_path / "d"))
    assert len(calls) == 2 and pickle.loads(pickle.dumps(listing)).paths == listing.paths == info.files


def test_parquet_string_labels_become_sorted_class_indices(ray_cluster, tmp_path, cfg):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import image_bytes

    names = ["tulip", "rose", None, "daisy", "rose"]
    pq.write_table(pa.table({"image": [image_bytes("png")] * 5, "label": names}), str(tmp_path / "s.parquet"))
    ds, info = build_source_dataset(cfg, str(tmp_path / "s.parquet"))
    assert info.has_labels and info.class_names == ["daisy", "rose", "tulip"]
    rows = _rows(ds)
    expected = [-1 if n is None else sorted({"tulip", "rose", "daisy"}).index(n) for n in names]
    assert [rows[f"{tmp_path / 's.parquet'}#{i}"]["label"] for i in range(5)] == expected


# ---- bytes actually read from a Parquet shard ------------------------------------------------------


class _CountingFile:
    """A read-only file that appends the size of every read to a log (one line per read, any process)."""

    def __init__(self, path: str, log: str) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._log = log
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        with open(self._log, "a") as f:
            f.write(f"{len(data)}\n")
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        self._f.close()
        self.closed = True


def _counting_handler_base():
    import pyarrow.fs as pafs

    class CountingHandler(pafs.FileSystemHandler):
        """A local file system whose input files count the bytes read into ``log``."""

        def __init__(self, log: str) -> None:
            self.log = log
            self.fs = pafs.LocalFileSystem()

        def __eq__(self, other):
            return isinstance(other, CountingHandler) and other.log == self.log

        def __ne__(self, other):
            return not self == other

        def __reduce__(self):
            return _counting_handler, (self.log,)

        def get_type_name(self):
            return "counting"

        def normalize_path(self, path):
            return path

        def get_file_info(self, paths):
            return self.fs.get_file_info(paths)

        def get_file_info_selector(self, selector):
            return self.fs.get_file_info(selector)

        def open_input_file(self, path):
            import pyarrow as pa

            return pa.PythonFile(_CountingFile(path, self.log), mode="r")

        def open_input_stream(self, path):
            return self.open_input_file(path)

        def create_dir(self, path, recursive):
            raise NotImplementedError

        def delete_dir(self, path):
            raise NotImplementedError

        def delete_dir_contents(self, path, missing_dir_ok=False):
            raise NotImplementedError

        def delete_root_dir_contents(self):
            raise NotImplementedError

        def delete_file(self, path):
            raise NotImplementedError

        def move(self, src, dest):
            raise NotImplementedError

        def copy_file(self, src, dest):
            raise NotImplementedError

        def open_output_stream(self, path, metadata):
            raise NotImplementedError

        def open_append_stream(self, path, metadata):
            raise NotImplementedError

    return CountingHandler


def _counting_handler(log: str):
    return _counting_handler_base()(log)


def _bytes_read(log: Path) -> int:
    return sum(int(line) for line in log.read_text().split()) if log.exists() else 0


def test_parquet_shard_is_read_once(ray_cluster, tmp_path, cfg, monkeypatch):
    """A 2,560-row shard in one row group is read about once (not once per 256-row slice, ~10x), every row once."""
    import pyarrow.fs as pafs

    path = tmp_path / "shard.parquet"
    write_parquet(path, 2560, kinds=["jpeg", "png"], size=(48, 64))
    size = path.stat().st_size
    log = tmp_path / "reads.log"
    counting = pafs.PyFileSystem(_counting_handler(str(log)))
    monkeypatch.setattr(sources, "resolve_uri", lambda uri: (counting, str(uri)))
    ds, info = build_source_dataset(cfg, str(path), shuffle_seed=1)
    listed = _bytes_read(log)  # the driver read the footer only
    assert info.num_items == 2560 and listed < 0.05 * size
    keys = [r["key"] for r in ds.select_columns(["key"]).take_all()]
    assert sorted(keys) == sorted(f"{path}#{i}" for i in range(2560))
    read = _bytes_read(log) - listed
    assert 0.9 * size <= read <= 1.2 * size, f"read {read} bytes of a {size}-byte file ({read / size:.1f}x)"


# ---- resuming inside a data epoch (issue #29, items 1 and 6) ----------------------------------------------------


class _CountingFS:
    """A local filesystem that records every file the reader opens (in-process reads only)."""

    def __init__(self) -> None:
        import pyarrow.fs as pafs

        self.fs, self.opened = pafs.LocalFileSystem(), []

    def open_input_stream(self, path):
        self.opened.append(path)
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        self.opened.append(path)
        return self.fs.open_input_file(path)


def _read_in_process(listing, seed, epoch, resume):
    """Rows (key, position) of data epoch ``epoch`` as the stream's read tasks emit them, and the files they open."""
    from pipelines.stream_position import StreamPosition

    position = StreamPosition(listing.positions_per_epoch, epochs={epoch: resume} if resume else {})
    plan, progress = sources.stream_plan(listing, seed, epoch, 1, position)
    fs = _CountingFS()
    rows = []
    for t in range(plan.num_tasks):
        for table in sources._read_stream_tasks({"id": [t]}, listing, fs, seed, plan, progress):
            rows += list(zip(table.column("key").to_pylist(), table.column("position").to_pylist()))
    return rows, fs.opened


def test_resumed_folder_epoch_reads_only_the_images_still_owed(tmp_path, cfg):
    """150 images = read units of 64, 64 and 22 positions. A position whose watermark is inside the second unit, with
    two positions above it and the whole third unit consumed (rows trained by a rank that ran ahead): the resumed
    epoch emits exactly the other positions, each with the key it has in the full epoch, and opens no other file."""
    from pipelines.stream_position import EpochProgress

    write_images(tmp_path / "d", 150, kinds=["png"], size=(8, 8))
    listing = sources.list_source(cfg, str(tmp_path / "d"))
    full, opened = _read_in_process(listing, 5, 2, None)
    assert [p for _, p in full] == list(range(150)) and len(opened) == 150
    resume = EpochProgress()
    resume.add([*range(70), 75, 80, *range(128, 150)])
    assert resume.watermark == 70
    rows, opened = _read_in_process(listing, 5, 2, resume)
    owed = [p for p in range(70, 128) if p not in (75, 80)]
    assert [p for _, p in rows] == owed
    assert rows == [full[p] for p in owed]  # the same image at the same position
    assert sorted(opened) == sorted(k for k, _ in rows)  # nothing consumed is read


def test_resumed_parquet_epoch_skips_consumed_units_unopened(tmp_path, cfg):
    """900 rows in row groups of 300: three read units, each permuted per epoch. Half the first unit of the epoch's
    order consumed (the watermark is inside it), the second untouched, the third consumed whole (a rank ran ahead):
    two units are opened, not three, and exactly the rows owed come out, at the positions they have in the full
    epoch."""
    from pipelines.stream_position import EpochProgress

    write_parquet(tmp_path / "p.parquet", 900, kinds=["png"], row_group_size=300, size=(8, 8))
    listing = sources.list_source(cfg, str(tmp_path / "p.parquet"))
    assert listing.num_units == 3 and listing.positions_per_epoch == 900
    full, opened = _read_in_process(listing, 5, 1, None)
    assert [p for _, p in full] == list(range(900)) and len(opened) == 3
    resume = EpochProgress()
    resume.add([*range(150), *range(600, 900)])
    rows, opened = _read_in_process(listing, 5, 1, resume)
    owed = list(range(150, 600))
    assert rows == [full[p] for p in owed] and len(opened) == 2


def test_resumed_stream_emits_the_complement_in_order_with_bounded_tasks(ray_cluster, tmp_path, cfg, monkeypatch):
    """Through Ray Data, two data epochs: a stream resumed from a position (epoch 0 partly trained, epoch 1 barely
    started) emits every position it owes once, with the image it has in the uninterrupted stream, in (epoch,
    position) order. The same with read tasks of 32 rows and at most 3 id blocks (the streaming repartition that
    keeps tasks small on a long run): the same rows, in the same order."""
    import numpy as np

    from pipelines.stream_position import StreamPosition, encode

    write_images(tmp_path / "d", 100, kinds=["png"], size=(8, 8))
    listing = sources.list_source(cfg, str(tmp_path / "d"))

    def rows(**kw):
        ds, _ = build_source_dataset(cfg, listing=listing, shuffle_seed=3, num_epochs=2, **kw)
        return [(r["epoch"], r["position"], r["key"]) for r in ds.select_columns(["epoch", "position", "key"])
                .take_all()]

    full = rows()
    assert [(e, p) for e, p, _ in full] == [(e, p) for e in (0, 1) for p in range(100)]
    rng = np.random.default_rng(0)
    position = StreamPosition(100)
    position.add(encode([0] * 80, [*range(50), *rng.choice(np.arange(50, 100), 30, replace=False)]))
    position.add(encode([1, 1], [4, 9]))
    owed = [(e, p, k) for e, p, k in full if position.epochs[e].needed(p, p + 1)[0]]
    assert len(owed) == 20 + 98
    assert rows(resume=position) == owed
    monkeypatch.setattr(sources, "STREAM_TASK_ROWS", 32)
    monkeypatch.setattr(sources, "MAX_ID_BLOCKS", 3)
    assert sources.stream_plan(listing, 3, 0, 2, position)[0].num_tasks > 3  # the repartitioned path
    assert rows(resume=position) == owed


def test_read_tasks_stay_small_however_long_the_run(monkeypatch):
    """Issue #29, item 6: at 100M folder images x 800 epochs a read task held ~1.6M images (a 50,000-task cap over
    the run). Now a task reads STREAM_TASK_ROWS images at any length; the task ids come from at most MAX_ID_BLOCKS
    range blocks, cut into one-id blocks by a streaming repartition (tested above through Ray Data)."""
    import numpy as np

    from pipelines.stream_position import EpochProgress, StreamPosition

    class Listing:  # what stream_plan reads of a 100M-image folder listing, without 100M paths
        num_units = 100_000_000 // sources.FOLDER_FILES_PER_UNIT
        positions_per_epoch = 100_000_000

        def unit_bounds(self, seed, epoch):
            return np.minimum(np.arange(self.num_units + 1) * sources.FOLDER_FILES_PER_UNIT, 100_000_000)

    resume = StreamPosition(100_000_000, start=3, epochs={3: EpochProgress(99_000_000)})
    plan, _ = sources.stream_plan(Listing(), 0, 3, 800, resume)
    rows = (plan.units_per_task * sources.FOLDER_FILES_PER_UNIT)
    assert rows == sources.STREAM_TASK_ROWS == 1024
    assert plan.num_tasks == 977 + 799 * 97_657  # the resumed epoch starts at its watermark's unit
    assert plan.task(0) == (3, 1_546_875, 1_546_891) and plan.task(977) == (4, 0, 16)
    assert plan.task(plan.num_tasks - 1) == (802, 1_562_496, 1_562_500)
    assert plan.num_tasks > sources.MAX_ID_BLOCKS  # so the stream repartitions its ids
