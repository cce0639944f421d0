"""What a run is judged on (pipelines/eval_split.py), the preset chosen for the data (ibot_ray/recipe.py), the run's
name and its record (pipelines/pretrain.py): the driver's decisions, without Ray.

The end-to-end runs of each evaluation case: a labelled folder judged on its own held-out split in test_pretrain.py,
an unlabelled one without any k-NN in test_console.py's CLI run, an explicit split in test_api.py's run."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ibot_ray.config import ConfigError, load_config
from ibot_ray.recipe import CPU_STEP_BUDGET, choose_preset
from pipelines import eval_split
from pipelines.eval_split import holdout_size, plan_evaluation, stratified_pick
from pipelines.knn_eval import open_labelled_pair
from pipelines.pretrain import claim_run, run_name_for
from pipelines.sources import DEMO_DIR, _read_parquet_unit, list_source, sample_image_sides


def _plan(source: str, *sets: str):
    cfg = load_config("demo", [f"data.source={source}", *sets])
    listing = list_source(cfg)
    return cfg, listing, plan_evaluation(cfg, listing)


def test_holdout_size_rule():
    assert holdout_size(400, 0.1, 2000) == 80  # a fifth of a small source: 40 queries would move 2.5 points each
    assert holdout_size(2960, 0.1, 2000) == 296  # a tenth
    assert holdout_size(60_000, 0.1, 2000) == 2000  # at most data.eval_max_images
    assert holdout_size(100_000_000, 0.1, 2000) == 2000
    assert holdout_size(3, 0.1, 2000) == 1 and holdout_size(1, 0.1, 2000) == 0  # never more than half


def test_stratified_pick_gives_each_class_its_share_and_keeps_one():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20 + [3] * 1)
    rng = np.random.default_rng(0)
    picked = stratified_pick(labels, 20, rng)
    counts = collections.Counter(labels[picked].tolist())
    assert len(picked) == 20 and len(set(picked.tolist())) == 20
    assert counts == {0: 10, 1: 6, 2: 4}  # proportional; the one-image class keeps its image for training
    again = stratified_pick(labels, 20, np.random.default_rng(0))
    assert picked.tolist() == again.tolist()  # deterministic for a seed
    assert stratified_pick(labels, 20, np.random.default_rng(1)).tolist() != picked.tolist()


def test_labelled_folder_is_judged_on_its_own_held_out_split(tmp_path, image_writer):
    written = image_writer(tmp_path / "photos", 60, kinds=("jpeg", "png"), classes=["cat", "dog", "eel"],
                           size=(40, 40))
    cfg, listing, plan = _plan(str(tmp_path / "photos"))
    assert plan.kind == "held_out" and plan.enabled
    assert plan.split.startswith(f"held-out split of {tmp_path / 'photos'} (12 images of 3 classes")
    queries, bank = plan.queries, plan.bank
    assert len(queries) == 12 and plan.held_out == 12  # min(200, 60 // 5)
    assert collections.Counter(queries.labels.tolist()) == {0: 4, 1: 4, 2: 4}  # stratified
    # which label goes with which image: the label is the image's class folder
    for path, label in zip(queries.paths + bank.paths, queries.labels.tolist() + bank.labels.tolist()):
        assert queries.label_map.name(label) == Path(path).parent.name
        assert written["labels"][path] == label
    # held out of training: the run trains on the other 48, the bank among them
    train = set(plan.train_listing.paths)
    assert plan.train_listing.info.num_items == 48 == len(train) and not train & set(queries.paths)
    assert set(bank.paths) <= train and len(bank) == 48
    assert listing.info.num_items == 60  # the full listing itself is unchanged
    # the same config, the same split: a resume trains on the same images
    assert _plan(str(tmp_path / "photos"))[2].queries.paths == queries.paths
    assert _plan(str(tmp_path / "photos"), "data.seed=1")[2].queries.paths != queries.paths


def test_labelled_parquet_held_out_rows_are_never_read_for_training(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"c{i % 4}" for i in range(1000)]
    pq.write_table(pa.table({"image": pa.array([bytes(rng.integers(0, 255, 8, np.uint8)) for _ in names]),
                             "label": pa.array(names)}), tmp_path / "d.parquet", row_group_size=100)
    cfg, listing, plan = _plan(str(tmp_path / "d.parquet"), "data.eval_max_images=150")
    held = {f"{path}#{row}" for path, row in plan.queries.rows}
    assert len(held) == 150 and plan.train_listing.info.num_items == 850
    assert collections.Counter(plan.queries.labels.tolist()) == {0: 38, 1: 38, 2: 37, 3: 37}
    assert [plan.queries.label_map.name(v) for v in plan.queries.labels[:4]] == \
        [names[row] for _, row in plan.queries.rows[:4]]
    trained = []
    rows = plan.train_listing.unit_rows()  # what each unit emits: the stream's positions (resume inside an epoch)
    assert plan.train_listing.positions_per_epoch == 850 and listing.positions_per_epoch == 1000
    for unit, n in zip(plan.train_listing.units, rows):
        positions = []
        for table in _read_parquet_unit(unit, plan.train_listing.fs, "image", "label",
                                        plan.train_listing.class_to_idx, shuffle_seed=(0, 0, 0)):
            trained += table.column("key").to_pylist()
            positions += table.column("position").to_pylist()
        assert positions == list(range(n))
    assert len(trained) == len(set(trained)) == 850 and not held & set(trained)


def test_a_large_source_is_sampled_not_read_whole(tmp_path, monkeypatch):
    """Above LABEL_SAMPLE_ROWS the driver reads the labels of a sample of read units only."""
    monkeypatch.setattr(eval_split, "LABEL_SAMPLE_ROWS", 300)
    pq.write_table(pa.table({"image": pa.array([b"x"] * 2000), "label": pa.array([i % 5 for i in range(2000)])}),
                   tmp_path / "big.parquet", row_group_size=100)
    cfg, listing, plan = _plan(str(tmp_path / "big.parquet"))
    assert plan.notes and "sample of 300 of the 2000" in plan.notes[0]
    units = {row // 100 for _, row in plan.queries.rows + plan.bank.rows}
    assert len(units) == 3  # three 100-row units sampled
    assert plan.held_out == len(plan.queries) == min(200, 2000 // 5)
    assert plan.train_listing.info.num_items == 2000 - plan.held_out


def test_unlabelled_folder_gets_no_foreign_k_nn(tmp_path, image_writer):
    image_writer(tmp_path / "flat", 8, kinds=("jpeg",), size=(40, 40))
    _, listing, plan = _plan(str(tmp_path / "flat"))
    assert plan.kind == "none" and not plan.enabled and plan.queries is None
    assert plan.train_listing is listing  # nothing held out
    assert str(tmp_path / "flat") in plan.why_none and "unlabelled" in plan.why_none
    assert "ibot-ray eval" in plan.why_none and "demo" not in plan.why_none


def test_an_explicit_eval_source_wins(tmp_path, image_writer):
    image_writer(tmp_path / "train", 30, kinds=("jpeg",), classes=["a", "b"], size=(40, 40))
    image_writer(tmp_path / "val", 10, kinds=("png",), classes=["a", "b"], size=(40, 40))
    _, listing, plan = _plan(str(tmp_path / "train"), f"data.eval_source={tmp_path / 'val'}")
    assert plan.kind == "explicit" and plan.enabled and plan.held_out == 0
    assert plan.train_listing is listing  # nothing held out of training
    assert all(Path(p).parts[-3] == "val" for p in plan.queries.paths) and len(plan.queries) == 10
    assert all(Path(p).parts[-3] == "train" for p in plan.bank.paths) and len(plan.bank) == 30
    assert plan.split == f"split {tmp_path / 'val'} (10 images)"


def test_the_demo_is_judged_as_before():
    """The demo's data keeps the demo's own pair of splits: the same images, in the same order, as the explicit
    pair, and the quick start's baselines on it (65.4 % random init, 80.1 % raw pixels)."""
    cfg, _, plan = _plan("demo")
    assert plan.kind == "demo" and plan.train_listing.info.num_items == 4000  # nothing held out of the demo
    bank, queries = open_labelled_pair(str(DEMO_DIR / "train.parquet"), str(DEMO_DIR / "test.parquet"), cfg,
                                       max_images=cfg.data.eval_max_images)
    assert plan.bank.rows == bank.rows and plan.queries.rows == queries.rows
    assert plan.bank.labels.tolist() == bank.labels.tolist() and plan.queries.labels.tolist() == queries.labels.tolist()
    import torch

    from ibot_ray.model import build_student_teacher
    from pipelines.knn_eval import KNNEvaluator

    ev = KNNEvaluator(cfg, plan)
    torch.manual_seed(cfg.train.seed)
    _, teacher = build_student_teacher(cfg)
    assert round(ev.evaluate(teacher.backbone)["knn_top1"], 1) == 65.4
    assert round(ev.pixel_baseline()["knn_top1"], 1) == 80.1


def test_preset_for_the_data():
    small_cpu = choose_preset(28, 4000, gpu=False)
    assert small_cpu.preset == "demo" and small_cpu.overrides == {}  # the demo's own size: its own budget
    assert small_cpu.reasons[0].startswith("--config demo: 4000 small images (median shorter side 28 px")
    assert choose_preset(32, 60_000, gpu=True).preset == "small_gpu"
    photos = choose_preset(400, 2664, gpu=False)
    assert photos.preset == "photo_cpu" and "optim.epochs" not in photos.overrides  # its reference size
    many = choose_preset(400, 64 * 500, gpu=False)  # more images on a CPU: the same minutes, fewer epochs
    assert many.overrides["optim.epochs"] == round(CPU_STEP_BUDGET["photo_cpu"] / 500)
    few = choose_preset(400, 100, gpu=False)
    assert few.overrides["optim.batch_size"] == 16  # at least four steps per epoch
    gpu = choose_preset(400, 50_000, gpu=True)
    assert gpu.preset == "vit_small_16" and gpu.overrides["optim.epochs"] == 100
    assert gpu.overrides["optim.momentum_teacher"] == "auto" and gpu.overrides["optim.warmup_epochs"] == "auto"
    mine = choose_preset(400, 64 * 500, gpu=False, user_set=frozenset({"optim.epochs"}))
    assert "optim.epochs" not in mine.overrides  # what the user set is never derived
    for c in (small_cpu, photos, many, few, gpu):  # every choice loads as a valid config
        load_config(c.preset, [f"{k}={v}" for k, v in c.overrides.items()])


def test_image_sides_are_read_from_headers(tmp_path, image_writer, parquet_writer):
    image_writer(tmp_path / "f", 6, kinds=("jpeg", "png"), size=(40, 56), bad=["corrupt"])
    cfg = load_config("demo", [f"data.source={tmp_path / 'f'}"])
    assert sample_image_sides(list_source(cfg), n=32) == [40] * 6  # the corrupt file is left out
    parquet_writer(tmp_path / "p.parquet", 20, kinds=("jpeg",), size=(30, 90))
    cfg = load_config("demo", [f"data.source={tmp_path / 'p.parquet'}"])
    assert sample_image_sides(list_source(cfg), n=8) == [30] * 8


def test_run_name_from_the_data():
    assert run_name_for("photos/") == "photos"
    assert run_name_for("/data/train.parquet") == "train"
    assert run_name_for("s3://bucket/imgs/") == "imgs" and run_name_for("s3://bucket") == "bucket"
    assert run_name_for("my photos") == "my_photos" and run_name_for("demo") == "demo"


def test_a_run_folder_refuses_another_source_or_config(tmp_path):
    run = str(tmp_path / "runs" / "photos")
    claim_run(run, str(tmp_path / "photos"), "photo_cpu")
    claim_run(run, str(tmp_path / "photos"), "photo_cpu")  # the same run again: a resume
    claim_run(run, os.path.relpath(tmp_path / "photos"), None)  # the same folder, relative; no preset named
    with pytest.raises(ConfigError, match="holds a run of source .*photos.*this command has source .*other"):
        claim_run(run, str(tmp_path / "other"), "photo_cpu")
    with pytest.raises(ConfigError, match="config 'photo_cpu'.*config 'demo'.*another --name"):
        claim_run(run, str(tmp_path / "photos"), "demo")
