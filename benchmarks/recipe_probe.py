"""Compare recipes quickly: the method trained in one process (no Ray), the k-NN of teacher and student per epoch.

    python benchmarks/recipe_probe.py [--config demo] [--set key=value ...] [--epochs-per-eval 5] [--threads 1]

The same step (``IBOTStep``), crops (``MultiCropTransform``), schedules and online k-NN (``KNNEvaluator`` on
``data.eval_source``, the demo's splits by default) as ``ibot-ray pretrain``, without Ray Data and Ray Train: one
thread trains while another probe runs on the other core, so two recipes compare side by side on a 2-core machine.
Each evaluation prints one JSON line: epoch, step, seconds, [CLS] / MIM loss, the run-health means of the epoch
(``teacher_entropy_frac``, ``prototypes_used``, ``feature_std``), and the teacher's and the student's k-NN top-1.
The first line holds the random-init k-NN and the raw-pixel k-NN of the same split; with ``--final-eval-max-images N``
a last line judges all four again on larger splits (the full Fashion-MNIST bank, where the online k-NN uses 5,000).
``benchmarks/quality.py`` is the judge of a recipe (the real pipeline, the linear probe); this is for choosing what
to give it.

``--supervised`` trains the same backbone on the same crops, batches, lr and weight-decay schedules with the labels
instead (cross-entropy of a linear layer on each global crop's [CLS]): the k-NN a budget allows when the labels are
known, a ceiling for what self-supervision can reach at that length.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from ibot_ray.knn import normalize_images
from ibot_ray.step import apply_schedule, param_groups


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--epochs-per-eval", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--supervised", action="store_true", help="train on the labels instead (the budget's ceiling)")
    ap.add_argument("--final-eval-max-images", type=int, default=0,
                    help="after training, judge random init, raw pixels, teacher and student again on splits of up to "
                         "N images each (e.g. 70000: the full Fashion-MNIST splits); 0: no final evaluation")
    a = ap.parse_args(argv)

    from ibot_ray.config import load_config
    from ibot_ray.model import build_student_teacher
    from ibot_ray.multicrop import MultiCropTransform
    from ibot_ray.step import IBOTStep
    from pipelines.knn_eval import KNNEvaluator
    from pipelines.sources import resolve_source

    torch.set_num_threads(a.threads)
    cfg = load_config(a.config, a.overrides)
    columns = [cfg.data.image_column] + ([cfg.data.label_column] if a.supervised else [])
    table = pq.read_table(resolve_source(cfg.data.source, "train"), columns=columns)
    images = table.column(cfg.data.image_column).to_pylist()
    evaluator = KNNEvaluator(cfg)
    torch.manual_seed(cfg.train.seed)
    student, teacher = build_student_teacher(cfg)
    initial = copy.deepcopy(teacher.backbone) if a.final_eval_max_images else None
    b = cfg.optim.batch_size
    steps_per_epoch = len(images) // b
    runner = IBOTStep(cfg, student, teacher, steps_per_epoch=steps_per_epoch)
    if a.supervised:
        runner = SupervisedStep(runner, np.asarray(table.column(cfg.data.label_column).to_numpy(), np.int64))
    transform = MultiCropTransform(cfg)
    rows = [{"overrides": a.overrides, "random_init_knn": evaluator.evaluate(teacher.backbone)["knn_top1"],
             "pixel_knn": evaluator.pixel_baseline()["knn_top1"], "steps_per_epoch": steps_per_epoch}]
    print(json.dumps(rows[0]), flush=True)
    rng = np.random.default_rng(cfg.data.seed)
    t0 = time.time()
    keys = ("cls", "mim", "teacher_entropy_frac", "prototypes_used", "feature_std")
    for epoch in range(cfg.optim.epochs):
        sums = dict.fromkeys(keys, 0.0)
        order = rng.permutation(len(images))
        for s in range(steps_per_epoch):
            idx = order[s * b:(s + 1) * b]
            out, _ = transform([images[i] for i in idx], rng.integers(0, 2**62, len(idx)).tolist(), epoch)
            crops = {k: torch.from_numpy(v) for k, v in out.items() if k != "index"}
            m = runner(crops, idx) if a.supervised else runner(crops)
            for k in keys:
                sums[k] += m[k] / steps_per_epoch
        if (epoch + 1) % a.epochs_per_eval == 0 or epoch + 1 == cfg.optim.epochs:
            row = {"epoch": epoch + 1, "step": runner.step, "s": round(time.time() - t0),
                   **{k: round(v, 3) for k, v in sums.items()},
                   "teacher_knn": evaluator.evaluate(teacher.backbone)["knn_top1"],
                   "student_knn": evaluator.evaluate(student.backbone)["knn_top1"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.final_eval_max_images:
        final = KNNEvaluator(load_config(a.config, [*a.overrides, f"data.eval_max_images={a.final_eval_max_images}"]))
        row = {"final_eval_max_images": a.final_eval_max_images, "s": round(time.time() - t0),
               "random_init_knn": final.evaluate(initial)["knn_top1"],
               "pixel_knn": final.pixel_baseline()["knn_top1"],
               "teacher_knn": final.evaluate(teacher.backbone)["knn_top1"],
               "student_knn": final.evaluate(student.backbone)["knn_top1"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


class SupervisedStep:
    """The ceiling: ``IBOTStep``'s backbone, param groups and lr / weight-decay schedules, trained with cross-entropy
    on the labels of every global crop's [CLS]."""

    def __init__(self, ibot, labels: np.ndarray) -> None:
        self.ibot, self.labels = ibot, torch.from_numpy(labels)
        self.backbone = ibot.student.backbone
        self.classifier = torch.nn.Linear(self.backbone.embed_dim, int(labels.max()) + 1)
        o = ibot.cfg.optim
        self.opt = torch.optim.AdamW(param_groups(torch.nn.ModuleList([self.backbone, self.classifier])),
                                     lr=0.0, betas=o.betas, eps=o.eps)
        self.step = 0

    def __call__(self, batch: dict, idx: np.ndarray) -> dict:
        apply_schedule(self.opt, self.ibot.schedules.at(self.step))
        crops = batch["global_crops"]  # (B, G, 3, S, S) uint8, made crop-major as IBOTStep does
        x = normalize_images(self.ibot._crop_major(crops), self.ibot.mean, self.ibot.std)
        y = self.labels[torch.from_numpy(idx)].repeat(crops.shape[1])  # crop-major: the batch's labels per crop
        loss = torch.nn.functional.cross_entropy(self.classifier(self.backbone(x)[:, 0]), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return {"cls": float(loss), "mim": 0.0, "teacher_entropy_frac": 0.0, "prototypes_used": 0.0,
                "feature_std": 0.0}


if __name__ == "__main__":
    main()
