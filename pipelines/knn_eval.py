"""Labelled evaluation splits and the weighted k-NN accuracy of a backbone on them.

The k-NN protocol (DINO/iBOT): teacher CLS features of the memory bank (labelled training images) and of the queries
(the held-out split), L2-normalised, cosine similarity, k = 20, T = 0.07. Splits are small by design
(``data.eval_max_images`` per split), decoded once per process with the eval transform (resize, centre crop) and kept as
uint8 tensors, so the online k-NN costs two forward passes over a few thousand images.

``"demo"`` means the shipped Fashion-MNIST sample: the memory bank is its training split, the queries its test split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ibot_ray.config import IBOTConfig
from ibot_ray.decode import ImageDecodeError, decode_image
from ibot_ray.knn import eval_transform, extract_features, knn_classify
from pipelines.sources import DEMO_DIR, IMAGE_EXTENSIONS

log = logging.getLogger(__name__)



@dataclass
class LabelledSplit:
    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor  # int64 (N,)
    skipped: int  # undecodable images left out


def _read_labelled(source: str, cfg: IBOTConfig, max_images: int) -> list[tuple[bytes, int]]:
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path = pafs.FileSystem.from_uri(source) if "://" in source else (pafs.LocalFileSystem(), str(Path(source)))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"eval source {source!r} does not exist")
    d = cfg.data
    if info.type == pafs.FileType.File and path.endswith(".parquet"):
        cols = [d.image_column, d.label_column]
        table = pq.read_table(path, filesystem=fs, columns=cols).slice(0, max_images)
        return list(zip(table.column(d.image_column).to_pylist(), table.column(d.label_column).to_pylist()))
    files = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    parquet = sorted(f.path for f in files if f.type == pafs.FileType.File and f.path.endswith(".parquet"))
    if parquet:
        out: list[tuple[bytes, int]] = []
        for p in parquet:
            t = pq.read_table(p, filesystem=fs, columns=[d.image_column, d.label_column])
            out += list(zip(t.column(d.image_column).to_pylist(), t.column(d.label_column).to_pylist()))
            if len(out) >= max_images:
                break
        return out[:max_images]
    images = sorted(f.path for f in files
                    if f.type == pafs.FileType.File and f.path.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
    root = path.rstrip("/")
    classes = sorted({p[len(root) + 1:].split("/")[0] for p in images if "/" in p[len(root) + 1:]})
    if not classes:
        raise ValueError(f"eval source {source!r}: k-NN needs labels (ImageFolder class subfolders or a label column)")
    index = {c: i for i, c in enumerate(classes)}
    # Take images round-robin over classes so a capped split still covers every class.
    by_class: dict[int, list[str]] = {}
    for p in images:
        rel = p[len(root) + 1:]
        if "/" in rel:
            by_class.setdefault(index[rel.split("/")[0]], []).append(p)
    picked: list[tuple[str, int]] = []
    i = 0
    while len(picked) < max_images and any(i < len(v) for v in by_class.values()):
        for c, v in by_class.items():
            if i < len(v) and len(picked) < max_images:
                picked.append((v[i], c))
        i += 1
    out = []
    for p, c in picked:
        with fs.open_input_file(p) as f:
            out.append((f.read(), c))
    return out


def load_labelled_split(source: str, cfg: IBOTConfig, *, max_images: int | None = None) -> LabelledSplit:
    """Decode and eval-transform up to ``max_images`` labelled images; undecodable ones are counted and skipped."""
    max_images = max_images or cfg.data.eval_max_images
    rows = _read_labelled(source, cfg, max_images)
    size = cfg.eval.image_size
    imgs, labels, skipped = [], [], 0
    for data, label in rows:
        try:
            arr = decode_image(data, max_pixels=cfg.data.max_image_pixels)
        except ImageDecodeError as e:
            skipped += 1
            log.warning("k-NN split %s: skipped an image: %s", source, e)
            continue
        imgs.append(eval_transform(arr, size))
        labels.append(int(label))
    if not imgs:
        raise ValueError(f"eval source {source!r}: no decodable labelled images")
    return LabelledSplit(torch.from_numpy(np.stack(imgs)), torch.tensor(labels, dtype=torch.int64), skipped)


def eval_sources(cfg: IBOTConfig) -> tuple[str, str] | None:
    """(memory bank source, query source) for the online k-NN, or None when no labelled split is configured."""
    d = cfg.data
    if not d.eval_source:
        return None
    if d.eval_source == "demo":
        return str(DEMO_DIR / "train.parquet"), str(DEMO_DIR / "test.parquet")
    bank = d.eval_train_source or (str(DEMO_DIR / "train.parquet") if d.source == "demo" else d.source)
    return bank, d.eval_source


class KNNEvaluator:
    """Holds the two decoded splits; ``evaluate(backbone)`` returns {"knn_top1", "knn_top5"} in percent."""

    def __init__(self, cfg: IBOTConfig) -> None:
        srcs = eval_sources(cfg)
        if srcs is None:
            raise ValueError("data.eval_source is not set: no labelled split for k-NN")
        self.cfg = cfg
        self.bank = load_labelled_split(srcs[0], cfg)
        self.queries = load_labelled_split(srcs[1], cfg)

    @torch.no_grad()
    def evaluate(self, backbone: torch.nn.Module, *, device: torch.device | str = "cpu", batch_size: int = 256) -> dict:
        was_training = backbone.training
        backbone.eval()

        def batches(x: torch.Tensor):
            for i in range(0, len(x), batch_size):
                yield x[i:i + batch_size]

        fb = extract_features(backbone, batches(self.bank.images), device=device)
        fq = extract_features(backbone, batches(self.queries.images), device=device)
        num_classes = int(max(self.bank.labels.max(), self.queries.labels.max())) + 1
        r = knn_classify(fb, self.bank.labels, fq, self.queries.labels, k=self.cfg.eval.knn_k,
                         temperature=self.cfg.eval.knn_temperature, num_classes=num_classes)
        backbone.train(was_training)
        return {"knn_top1": float(r["top1"]), "knn_top5": float(r["top5"])}
