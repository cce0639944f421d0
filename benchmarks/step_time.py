"""Time of one full iBOT training step against the bare student update it is built around.

    python benchmarks/step_time.py [--config demo] [--set key=value ...] [--batch 32] [--steps 10] [--device cpu]

Both are measured in the same run, on the same uint8 crops, with the same model:
  (a) ``IBOTStep``: normalise, teacher forward, student forward on masked globals + locals, iBOT loss, backward,
      per-parameter clipping, AdamW, teacher EMA, center update;
  (b) baseline: student forward on the same crops + a trivial loss on its [CLS] logits, backward, AdamW step.
The ratio (a)/(b) is the cost of everything iBOT adds on top of the student's own update.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ibot_ray.config import load_config
from ibot_ray.knn import normalize_images as normalize
from ibot_ray.model import build_student_teacher
from ibot_ray.step import IBOTStep


def make_batch(cfg, b: int, device) -> dict:
    c = cfg.crops
    h = c.global_crops_size // cfg.patch_size
    g = torch.Generator().manual_seed(0)
    return {
        "global_crops": torch.randint(0, 256, (b, c.global_crops_number, 3, c.global_crops_size, c.global_crops_size),
                                      dtype=torch.uint8, generator=g).to(device),
        "local_crops": torch.randint(0, 256, (b, c.local_crops_number, 3, c.local_crops_size, c.local_crops_size),
                                     dtype=torch.uint8, generator=g).to(device),
        "masks": (torch.rand(b, c.global_crops_number, h, h, generator=g) < 0.3).to(device),
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps: int, device) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cfg = load_config(a.config, a.overrides + ["train.num_workers=[1,1]", "optim.warmup_epochs=0",
                                              f"optim.batch_size={max(a.batch, 1)}"])
    batch = make_batch(cfg, a.batch, device)

    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg)
    runner = IBOTStep(cfg, student.to(device), teacher.to(device), steps_per_epoch=10_000, device=device)
    full = timed(lambda: runner(batch), a.steps, device)

    torch.manual_seed(0)
    base_student, _ = build_student_teacher(cfg)
    base_student.to(device).train()
    opt = torch.optim.AdamW(base_student.parameters(), lr=1e-4)
    c = cfg.crops

    def baseline():
        g = normalize(batch["global_crops"].transpose(0, 1).flatten(0, 1), runner.mean, runner.std)
        loc = normalize(batch["local_crops"].transpose(0, 1).flatten(0, 1), runner.mean, runner.std)
        m = batch["masks"].transpose(0, 1).flatten(0, 1)
        with runner._autocast():
            cls_g, patch_g = base_student(g, mask=m)
            cls_l, _ = base_student(loc, patches=False) if c.local_crops_number else (cls_g[:0], None)
            loss = cls_g.float().logsumexp(-1).mean() + cls_l.float().logsumexp(-1).mean() + patch_g.float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    base = timed(baseline, a.steps, device)
    f, b = statistics.median(full), statistics.median(base)
    imgs = a.batch
    print(f"config {a.config} {' '.join(a.overrides)} | arch {cfg.model.arch} depth {cfg.model.depth or 'default'} "
          f"| {c.global_crops_number}x{c.global_crops_size} + {c.local_crops_number}x{c.local_crops_size} px "
          f"| batch {imgs} | device {device} threads {torch.get_num_threads()}")
    print(f"baseline student-only update : {b * 1000:8.1f} ms/step  {imgs / b:8.1f} img/s")
    print(f"full iBOT step               : {f * 1000:8.1f} ms/step  {imgs / f:8.1f} img/s")
    print(f"ratio full / baseline        : {f / b:8.2f}x")


if __name__ == "__main__":
    main()
