"""Labelled k-NN splits: ImageFolder labels, Parquet labels, skipped undecodable images, demo source mapping."""

from pathlib import Path

import torch

from ibot_ray.config import load_config
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
    expected = sorted(written["labels"][p] for p in written["good"])
    assert sorted(split.labels.tolist()) == expected


def test_parquet_split_and_demo_mapping(tmp_path, parquet_writer):
    cfg = load_config("demo", ["data.eval_max_images=5"])
    info = parquet_writer(tmp_path / "val.parquet", 8)
    split = load_labelled_split(str(tmp_path / "val.parquet"), cfg)
    assert split.labels.tolist() == info["labels"][:5]
    plan = plan_evaluation(cfg, list_source(cfg))  # the demo's data: the demo's own pair of splits
    assert Path(plan.bank.uri).name == "train.parquet" and Path(plan.queries.uri).name == "test.parquet"
    off = load_config("demo", ["data.eval_source=null"])
    assert not plan_evaluation(off, list_source(off)).enabled


def test_evaluator_on_identical_features_is_perfect(tmp_path, parquet_writer):
    """With the queries equal to the memory bank, the nearest neighbour is the image itself: 100 % top-1."""
    parquet_writer(tmp_path / "s.parquet", 9)
    src = str(tmp_path / "s.parquet")
    cfg = load_config("demo", [f"data.eval_source={src}", f"data.eval_train_source={src}", "eval.knn_k=1"])

    class Pixels(torch.nn.Module):  # a "backbone" whose CLS token is the image itself
        def forward(self, x):
            return x.flatten(1).unsqueeze(1)

    r = KNNEvaluator(cfg).evaluate(Pixels())
    assert r["knn_top1"] == 100.0


def test_pixel_baseline_on_the_demo_data():
    """The raw-pixel baseline of the online k-NN: the demo's 28x28 grey images compared as stored (about 80 %)."""
    cfg = load_config("demo", ["data.eval_max_images=1000"])
    ev = KNNEvaluator(cfg)
    r = ev.pixel_baseline()
    assert r["view"] == "as stored 28x28x1" and r["variant"] in ("raw", "centred")
    assert 70.0 < r["knn_top1"] < 90.0 and r["knn_top5"] > 90.0
    assert ev.num_classes == 10
