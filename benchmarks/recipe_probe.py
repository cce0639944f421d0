"""Compare recipes quickly: the method trained in one process (no Ray), the k-NN of teacher and student per epoch.

    python benchmarks/recipe_probe.py [--config demo] [--set key=value ...] [--epochs-per-eval 5] [--threads 1]
        [--device cuda --loader-workers 5 --budget-seconds 240]

The same step (``IBOTStep``), crops (``MultiCropTransform``), schedules and online k-NN (``KNNEvaluator`` on
``data.eval_source``, the demo's splits by default) as ``ibot-ray pretrain``, without Ray Data and Ray Train: one
thread trains while another probe runs on the other core, so two recipes compare side by side on a 2-core machine.
Each evaluation prints one JSON line: epoch, step, seconds, [CLS] / MIM loss, the run-health means of the epoch
(``teacher_entropy_frac``, ``prototypes_used``, ``feature_std``), and the teacher's and the student's k-NN top-1.
The first line holds the random-init k-NN and the raw-pixel k-NN of the same split; with ``--final-eval-max-images N``
a last line judges all four again on larger splits (the full Fashion-MNIST bank, where the online k-NN uses 5,000),
with the linear probe of the teacher's features (``ibot_ray.linear_probe``, the recipe ``ibot-ray eval`` uses).
``benchmarks/quality.py`` is the judge of a recipe (the real pipeline, the linear probe); this is for choosing what
to give it.

``--supervised`` trains the same backbone on the same crops, batches, lr and weight-decay schedules with the labels
instead (cross-entropy of a linear layer on each global crop's [CLS]): the k-NN a budget allows when the labels are
known, a ceiling for what self-supervision can reach at that length.

On a GPU (``--device cuda``) the crops come from ``--loader-workers`` processes (the same order and seeds as in one
process: each step's images and seeds are drawn before the workers make them), and ``--budget-seconds S`` sets
``optim.epochs`` to what fits S seconds of training: it times steps of a throwaway copy of the model first, so the
schedules are planned for the run that actually happens (a fixed time budget, as the Fashion-MNIST hour has).
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
from ibot_ray.linear_probe import linear_probe
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
    ap.add_argument("--device", default="cpu", help="where the step and the k-NN features run: cpu or cuda")
    ap.add_argument("--loader-workers", type=int, default=0,
                    help="processes that make the crops (0: the training process makes them)")
    ap.add_argument("--budget-seconds", type=float, default=0.0,
                    help="set optim.epochs to what fits this many seconds of training, from timed steps of a "
                         "throwaway model (0: the config's epochs)")
    a = ap.parse_args(argv)
    device = torch.device(a.device)

    from ibot_ray.config import load_config
    from ibot_ray.model import build_student_teacher
    from ibot_ray.multicrop import MultiCropTransform
    from ibot_ray.step import IBOTStep
    from pipelines.knn_eval import KNNEvaluator, knn_accuracy
    from pipelines.sources import resolve_source

    torch.set_num_threads(a.threads)
    cfg = load_config(a.config, a.overrides)
    columns = [cfg.data.image_column] + ([cfg.data.label_column] if a.supervised else [])
    table = pq.read_table(resolve_source(cfg.data.source, "train"), columns=columns)
    images = table.column(cfg.data.image_column).to_pylist()
    labels = np.asarray(table.column(cfg.data.label_column).to_numpy(), np.int64) if a.supervised else None
    evaluator = KNNEvaluator(cfg)
    b = cfg.optim.batch_size
    steps_per_epoch = len(images) // b
    if not steps_per_epoch:
        ap.error(f"data.source {cfg.data.source!r}: {len(images)} images, fewer than one batch of {b}")
    batches = ProbeBatches(images, MultiCropTransform(cfg), b, a.loader_workers)

    def build() -> tuple:
        torch.manual_seed(cfg.train.seed)
        student, teacher = (m.to(device) for m in build_student_teacher(cfg))
        runner = IBOTStep(cfg, student, teacher, steps_per_epoch=steps_per_epoch, device=device)
        return student, teacher, SupervisedStep(runner, labels) if a.supervised else runner

    if a.budget_seconds:
        fit = fit_epochs(build()[2], batches, a.budget_seconds)
        cfg = load_config(a.config, [*a.overrides, f"optim.epochs={fit['epochs']}"])
        batches.transform = MultiCropTransform(cfg)
        print(json.dumps(fit), flush=True)
    student, teacher, runner = build()
    initial = copy.deepcopy(teacher.backbone) if a.final_eval_max_images else None
    rows = [{"overrides": a.overrides, "device": str(device),
             "random_init_knn": evaluator.evaluate(teacher.backbone, device=device)["knn_top1"],
             "pixel_knn": evaluator.pixel_baseline()["knn_top1"], "steps_per_epoch": steps_per_epoch,
             "epochs": cfg.optim.epochs}]
    print(json.dumps(rows[0]), flush=True)
    rng = np.random.default_rng(cfg.data.seed)
    t0 = time.time()
    keys = ("cls", "mim", "teacher_entropy_frac", "prototypes_used", "feature_std")
    for epoch in range(cfg.optim.epochs):
        sums = dict.fromkeys(keys, 0.0)
        for crops in batches.epoch(rng, epoch):
            m = runner(crops)
            for k in keys:
                sums[k] += m[k] / steps_per_epoch
        if (epoch + 1) % a.epochs_per_eval == 0 or epoch + 1 == cfg.optim.epochs:
            row = {"epoch": epoch + 1, "step": runner.step, "s": round(time.time() - t0),
                   **{k: round(v, 3) for k, v in sums.items()},
                   "teacher_knn": evaluator.evaluate(teacher.backbone, device=device)["knn_top1"],
                   "student_knn": evaluator.evaluate(student.backbone, device=device)["knn_top1"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.final_eval_max_images:
        final = KNNEvaluator(load_config(a.config, [*a.overrides, f"data.eval_max_images={a.final_eval_max_images}"]))
        bank, queries = final.features(teacher.backbone, device=device)
        row = {"final_eval_max_images": a.final_eval_max_images, "s": round(time.time() - t0),
               "random_init_knn": final.evaluate(initial, device=device)["knn_top1"],
               "pixel_knn": final.pixel_baseline()["knn_top1"],
               "teacher_knn": knn_accuracy(bank, final.bank.labels, queries, final.queries.labels, final.cfg,
                                           final.num_classes)["top1"],
               "student_knn": final.evaluate(student.backbone, device=device)["knn_top1"],
               "teacher_linear": linear_probe(bank, final.bank.labels, queries, final.queries.labels,
                                              num_classes=final.num_classes, device=device)["top1"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


class ProbeBatches(torch.utils.data.Dataset):
    """One epoch's batches of crops. The images and crop seeds of every step are drawn in the training process
    (``epoch``), so the batches are the same whether the crops are made there or by ``workers`` processes."""

    def __init__(self, images: list, transform, batch_size: int, workers: int) -> None:
        self.images, self.transform, self.batch_size, self.workers = images, transform, batch_size, workers
        self.plan: list[tuple[np.ndarray, list[int]]] = []
        self.epoch_index = 0

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, s: int) -> dict:
        idx, seeds = self.plan[s]
        out, _ = self.transform([self.images[i] for i in idx], seeds, self.epoch_index)
        crops = {k: torch.from_numpy(v) for k, v in out.items() if k != "index"}
        return {**crops, "index": torch.from_numpy(idx)}  # the images' rows in the table (for their labels)

    def epoch(self, rng: np.random.Generator, epoch: int, steps: int | None = None):
        """Yield the batches (crops and image rows) of one epoch's steps (all, or the first ``steps``)."""
        b = self.batch_size
        order = rng.permutation(len(self.images))
        n = min(steps or len(order) // b, len(order) // b)
        self.plan = [(order[s * b:(s + 1) * b], rng.integers(0, 2**62, b).tolist()) for s in range(n)]
        self.epoch_index = epoch
        if not self.workers:
            return (self[s] for s in range(n))
        return iter(torch.utils.data.DataLoader(self, batch_size=None, shuffle=False, num_workers=self.workers,
                                                pin_memory=torch.cuda.is_available(), prefetch_factor=4))


def fit_epochs(runner, batches: ProbeBatches, budget_s: float) -> dict:
    """The number of epochs that fits ``budget_s`` seconds of training: times steps of ``runner`` (a throwaway
    model) on the batches as the run will make them, after enough steps to fill the loader's queue."""
    warm = 4 * max(1, batches.workers) + 2
    timed = 20
    rng = np.random.default_rng(12345)
    for s, crops in enumerate(batches.epoch(rng, 0, warm + timed)):
        if s == warm:
            _sync(runner.device)
            t0 = time.perf_counter()
        runner(crops)
    _sync(runner.device)
    s_per_step = (time.perf_counter() - t0) / timed
    steps_per_epoch = len(batches.images) // batches.batch_size
    epochs = max(1, int(budget_s / (s_per_step * steps_per_epoch)))
    return {"budget_seconds": budget_s, "s_per_step": round(s_per_step, 4),
            "images_per_s": round(batches.batch_size / s_per_step), "epochs": epochs}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SupervisedStep:
    """The ceiling: ``IBOTStep``'s backbone, param groups and lr / weight-decay schedules, trained with cross-entropy
    on the labels of every global crop's [CLS]."""

    def __init__(self, ibot, labels: np.ndarray) -> None:
        self.ibot, self.device, self.labels = ibot, ibot.device, torch.from_numpy(labels).to(ibot.device)
        self.backbone = ibot.student.backbone
        self.classifier = torch.nn.Linear(self.backbone.embed_dim, int(labels.max()) + 1).to(ibot.device)
        o = ibot.cfg.optim
        self.opt = torch.optim.AdamW(param_groups(torch.nn.ModuleList([self.backbone, self.classifier])),
                                     lr=0.0, betas=o.betas, eps=o.eps)
        self.step = 0

    def __call__(self, batch: dict) -> dict:
        apply_schedule(self.opt, self.ibot.schedules.at(self.step))
        crops = batch["global_crops"]  # (B, G, 3, S, S) uint8, made crop-major as IBOTStep does
        x = normalize_images(self.ibot._crop_major(crops.to(self.device)), self.ibot.mean, self.ibot.std)
        y = self.labels[batch["index"].to(self.device)].repeat(crops.shape[1])  # crop-major: labels per crop
        loss = torch.nn.functional.cross_entropy(self.classifier(self.backbone(x)[:, 0]), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return {"cls": float(loss), "mim": 0.0, "teacher_entropy_frac": 0.0, "prototypes_used": 0.0,
                "feature_std": 0.0}


if __name__ == "__main__":
    main()
