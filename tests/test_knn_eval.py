"""Labelled k-NN splits: ImageFolder labels, Parquet labels, skipped undecodable images, demo source mapping."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ibot_ray.config import load_config
from ibot_ray.knn import eval_transform
from pipelines.eval_split import plan_evaluation
from pipelines.knn_eval import KNNEvaluator, load_labelled_split
from pipelines.sources import list_source


def test_folder_split_labels_and_skipped_images(tmp_path, image_writer):
    cfg = load_config("demo")
    written = image_writer(tmp_path / "val", 12, kinds=("jpeg", "png"), classes=["cat", "dog", "eel"],
                           bad=["truncated"])
    split = load_labelled_split(str(tmp_path / "val"), cfg)
    assert split.skipped == 1  # the truncated file is counted, not silently lost
    assert split.images.shape == (12, 3, cfg.eval.image_size, cfg.eval.image_size)
    assert split.images.dtype == torch.uint8
    # Each image keeps its own label: find every written file's eval view (decoded here by PIL) among the split's
    # images, and compare the label there with the file's class folder.
    size = cfg.eval.image_size
    views = {p: torch.from_numpy(eval_transform(np.asarray(Image.open(p).convert("RGB")), size))
             for p in written["good"]}
    for path, view in views.items():
        rows = [i for i in range(len(split.images)) if torch.equal(split.images[i], view)]
        assert len(rows) == 1, (path, rows)
        assert int(split.labels[rows[0]]) == written["labels"][path], path
    assert sorted(written["labels"][p] for p in written["good"]) == [0] * 4 + [1] * 4 + [2] * 4


def test_parquet_split_and_demo_mapping(tmp_path, parquet_writer):
    cfg = load_config("demo", ["data.eval_max_images=5"])
    info = parquet_writer(tmp_path / "val.parquet", 8)
    split = load_labelled_split(str(tmp_path / "val.parquet"), cfg)
    assert split.labels.tolist() == info["labels"][:5]
    plan = plan_evaluation(cfg, list_source(cfg))  # the demo's data: the demo's own pair of splits
    assert Path(plan.bank.uri).name == "train.parquet" and Path(plan.queries.uri).name == "test.parquet"
    off = load_config("demo", ["data.eval_source=null"])
    assert not plan_evaluation(off, list_source(off)).enabled


def test_evaluator_pairs_each_image_with_its_own_label(tmp_path, parquet_writer):
    """Queries that are the bank's images in another order, with their labels: with k = 1 on the pixels each query
    finds its own copy, so top-1 is 100 % only if both splits keep every label with its image; a query split whose
    labels are wrong for 2 of its 9 images scores exactly 7 / 9."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet_writer(tmp_path / "bank.parquet", 9)  # labels 0, 1, 2, 0, 1, 2, ...
    bank = pq.read_table(tmp_path / "bank.parquet")
    order = [4, 8, 0, 6, 2, 7, 1, 5, 3]
    queries = bank.take(order)
    pq.write_table(queries, tmp_path / "queries.parquet")
    labels = queries.column("label").to_pylist()
    labels[0], labels[1] = labels[1], labels[0]  # rows 4 and 8 of the bank: classes 1 and 2
    assert labels[0] != labels[1]
    two_wrong = queries.set_column(queries.schema.get_field_index("label"), "label", pa.array(labels, pa.int64()))
    pq.write_table(two_wrong, tmp_path / "two_wrong.parquet")

    class Pixels(torch.nn.Module):  # a "backbone" whose CLS token is the image itself
        def forward(self, x):
            return x.flatten(1).unsqueeze(1)

    def top1(query_file: str) -> float:
        cfg = load_config("demo", [f"data.eval_source={tmp_path / query_file}",
                                   f"data.eval_train_source={tmp_path / 'bank.parquet'}", "eval.knn_k=1"])
        return KNNEvaluator(cfg).evaluate(Pixels())["knn_top1"]

    assert top1("queries.parquet") == 100.0
    assert top1("two_wrong.parquet") == pytest.approx(100 * 7 / 9)


def test_pixel_baseline_on_the_demo_data():
    """The raw-pixel baseline of the online k-NN: the demo's 28x28 grey images compared as stored (about 80 %)."""
    cfg = load_config("demo", ["data.eval_max_images=1000"])
    ev = KNNEvaluator(cfg)
    r = ev.pixel_baseline()
    assert r["view"] == "as stored 28x28x1" and r["variant"] in ("raw", "centred")
    assert 70.0 < r["knn_top1"] < 90.0 and r["knn_top5"] > 90.0
    assert ev.num_classes == 10
