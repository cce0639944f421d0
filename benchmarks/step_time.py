"""Time of one full iBOT training step, what it costs in FLOPs, where its time goes, and the original code beside it.

    python benchmarks/step_time.py [--config demo] [--set key=value ...] [--batch 32] [--steps 10] [--rounds 3]
        [--device cpu|cuda] [--compile] [--profile] [--original PATH] [--no-baseline] [--json FILE]

Measured in the same run, on the same uint8 crops and the recipe's masks (the project's own MaskGenerator, so the
masked share is the recipe's: half the global crops unmasked, the others 10-50 %), with the same model:
  (a) ``IBOTStep``: staging (host-side masked-token positions, the copy to the device), normalise, teacher forward,
      student forward on masked globals + locals, iBOT loss, backward, per-parameter clipping, AdamW, teacher EMA,
      centre update; one step in ``--log-every`` (default: the config's train.log_every_steps) reads its metrics back,
      as in training. Timed over whole rounds of ``--steps`` steps (the step does not wait for the device in between);
  (b) baseline: student forward on the same crops + a trivial loss on its [CLS] logits, backward, AdamW step
      (``--no-baseline`` skips it). The ratio (a)/(b) is the cost of everything iBOT adds on top of the student's
      own update;
  (c) ``--original PATH``: the original iBOT step (github.com/bytedance/ibot checked out at PATH, built at run time by
      benchmarks/original_ibot.py) on the same crops and masks, in its own default precision (fp16 + GradScaler on a
      GPU); the ratio (c)/(a) is our speed-up.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one eager step of the same model (matmuls,
convolutions, attention; forward and backward): GFLOP per image, achieved TFLOP/s and, on a GPU whose dense bf16 peak
is in ``PEAK_TFLOPS``, the model FLOPs utilisation (MFU). ``--profile`` runs ``torch.profiler`` over a few steps:
wall time against the summed kernel time (ops on a CPU), kernel launches per step, time the host spent waiting in
syncs, the top kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs without the package installed

from ibot_ray.config import load_config, replace  # noqa: E402
from ibot_ray.device_budget import synthetic_batch  # noqa: E402
from ibot_ray.knn import normalize_images as normalize  # noqa: E402
from ibot_ray.model import build_student_teacher  # noqa: E402
from ibot_ray.recipe import resolved  # noqa: E402
from ibot_ray.step import IBOTStep  # noqa: E402

#: Dense bf16 tensor-core peak per device, TFLOP/s (vendor datasheets; SXM parts), matched by name
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
#: CUDA runtime calls in which the host waits for the device
#: The schedules' epoch length (long: the timed steps sit at the start of a long run)
STEPS_PER_EPOCH = 10_000
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def make_batch(cfg, b: int, device: torch.device) -> dict:
    """Random uint8 crops and the recipe's masks on the host (pinned for a GPU), as the data stream delivers them."""
    batch = synthetic_batch(cfg, b)
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    return batch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_rounds(fn, steps: int, rounds: int, device) -> list[float]:
    """Seconds per step of each round of ``steps`` calls (after one warm-up call), synchronised per round only."""
    fn(0)
    out = []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        for i in range(steps):
            fn(i)
        sync(device)
        out.append((time.perf_counter() - t0) / steps)
    return out


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def count_flops(cfg, batch, device) -> float:
    """FLOPs of one eager step (forward + backward, every matmul, convolution and attention) on a fresh model."""
    eager = replace(cfg, train={"compile": "false"})  # the counter sees the ops of an eager step
    student, teacher = build_student_teacher(eager)
    runner = IBOTStep(eager, student.to(device), teacher.to(device), steps_per_epoch=STEPS_PER_EPOCH, device=device)
    with FlopCounterMode(display=False) as fc:
        runner(batch, log=False)
    sync(device)
    del runner, student, teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return float(fc.get_total_flops())


def profile_steps(fn, steps: int, device) -> dict:
    """Wall time vs summed kernel time, launches, host time in syncs and the top kernels over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn(0)
    sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            fn(i)
        sync(device)
        wall = time.perf_counter() - t0
    events = prof.events()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        busy = sum(e.device_time for e in kernels) / 1e6  # us -> s
        name = "kernels"
    else:
        kernels = [e for e in events if e.name.startswith("aten::") and e.cpu_parent is None]
        busy = sum(e.cpu_time_total for e in kernels) / 1e6
        name = "top-level aten ops"
    syncs = [e for e in events if e.name in SYNC_CALLS]
    by_name: dict[str, float] = {}
    for e in kernels:
        t = e.device_time if device.type == "cuda" else e.cpu_time_total
        by_name[e.name] = by_name.get(e.name, 0.0) + t
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {
        "wall_ms_per_step": wall / steps * 1e3,
        "busy_ms_per_step": busy / steps * 1e3,
        "what": name,
        "launches_per_step": len(kernels) / steps,
        "syncs_per_step": len(syncs) / steps,
        "sync_ms_per_step": sum(e.cpu_time_total for e in syncs) / 1e3 / steps,
        "top": [(n[:90], t / 1e3 / steps, t / 1e6 / max(busy, 1e-12)) for n, t in top],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--batch", default="32", help="images per step; a comma list measures each in turn, \"max\" "
                    "the largest that fits on the GPU (measured, and printed beside the planner's estimate)")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--log-every", type=int, default=0, help="a logged step every N (0: train.log_every_steps)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--compile", action="store_true", help="train.compile=true (default: false)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--original", metavar="PATH", help="a checkout of github.com/bytedance/ibot to time beside ours")
    ap.add_argument("--no-baseline", action="store_true", help="skip the student-only baseline")
    ap.add_argument("--json", metavar="FILE", help="append the figures as one JSON line")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    for b in a.batch.split(","):
        if b == "max":
            b = measure_max(a, device)
        measure(a, int(b), device)


def config_for(a, b_n: int):
    fixed = ["train.num_workers=[1,1]", "optim.warmup_epochs=0", f"optim.batch_size={max(b_n, 1)}",
             "optim.micro_batch_size=0"]
    cfg = load_config(a.config, a.overrides + fixed + [f"train.compile={'true' if a.compile else 'false'}"])
    return resolved(cfg, STEPS_PER_EPOCH)  # `auto` settings derived as a run of this length would (the original too)


def measure_max(a, device: torch.device) -> int:
    """The largest micro-batch the step fits on this GPU (measured), printed beside the cluster planner's estimate."""
    if device.type != "cuda":
        raise SystemExit("--batch max needs a CUDA device (a CPU has no memory budget to measure)")
    from ibot_ray.device_budget import measure_images_per_device
    from pipelines.cluster_plan import USABLE_MEMORY_FRACTION, bytes_per_image, estimate_images_per_device

    cfg = config_for(a, 64)
    t0 = time.perf_counter()
    m = measure_images_per_device(cfg, device)
    gib = m["device_bytes"] / 2**30
    est = estimate_images_per_device(cfg, gib)
    at_planned = int((USABLE_MEMORY_FRACTION * m["device_bytes"] - m["fixed_bytes"]) // m["bytes_per_image"])
    frac, took = f"{USABLE_MEMORY_FRACTION:.0%}", time.perf_counter() - t0
    print(f"images_per_device measured   : {m['images_per_device']} images fit in one pass on this {gib:.0f} GiB card "
          f"(peak {m['peak_bytes'] / 2**30:.1f} GiB; {m['bytes_per_image'] / 2**20:.0f} MiB an image + "
          f"{m['fixed_bytes'] / 2**30:.2f} GiB fixed; {len(m['tries'])} tries in {took:.0f} s) | planner: {est} images "
          f"at {frac} of the memory ({bytes_per_image(cfg) / 2**20:.0f} MiB an image), measured at {frac}: "
          f"{at_planned}", flush=True)
    line = {"config": a.config, "overrides": a.overrides, "device": torch.cuda.get_device_name(device),
            "images_per_device": m["images_per_device"], "measured_mib_per_image": m["bytes_per_image"] / 2**20,
            "fixed_gib": m["fixed_bytes"] / 2**30, "planner_estimate": est, "measured_at_planner_fraction": at_planned,
            "planner_mib_per_image": bytes_per_image(cfg) / 2**20, "tries": m["tries"]}
    print("RESULT " + json.dumps(line), flush=True)
    if a.json:
        with open(a.json, "a") as fh:
            fh.write(json.dumps(line) + "\n")
    return m["images_per_device"]


def measure(a, b_n: int, device: torch.device) -> None:
    """Every figure of one batch size (see the module doc)."""
    cfg = config_for(a, b_n)
    batch = make_batch(cfg, b_n, device)
    log_every = a.log_every or cfg.train.log_every_steps
    c = cfg.crops
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out: dict = {"config": a.config, "overrides": a.overrides, "arch": cfg.model.arch, "batch": b_n,
                 "device": dev_name, "threads": torch.get_num_threads(), "precision": cfg.optim.precision,
                 "compile": a.compile, "masked_fraction": float(batch["masks"].float().mean())}
    print(f"config {a.config} {' '.join(a.overrides)} | arch {cfg.model.arch} depth {cfg.model.depth or 'default'} "
          f"| {c.global_crops_number}x{c.global_crops_size} + {c.local_crops_number}x{c.local_crops_size} px "
          f"| batch {b_n} | {dev_name} threads {torch.get_num_threads()} | compile {a.compile} "
          f"| masked {out['masked_fraction']:.1%} of the global patches", flush=True)

    flops = count_flops(cfg, batch, device)
    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg)
    runner = IBOTStep(cfg, student.to(device), teacher.to(device), steps_per_epoch=STEPS_PER_EPOCH, device=device)
    print(f"precision {runner.amp_dtype or torch.float32} | fused AdamW {runner.fused} | a logged step every "
          f"{log_every}", flush=True)

    def ours(i):
        runner(batch, log=(i + 1) % log_every == 0)

    t_compile = time.perf_counter()
    ours(0)  # the first steps compile (when compiled)
    ours(1)
    sync(device)
    out["first_steps_s"] = time.perf_counter() - t_compile
    full = timed_rounds(ours, a.steps, a.rounds, device)
    f = statistics.median(full)
    out.update(ms_per_step=f * 1e3, ms_range=[min(full) * 1e3, max(full) * 1e3], img_per_s=b_n / f,
               gflop_per_img=flops / b_n / 1e9, tflops=flops / f / 1e12)
    peak = peak_tflops(device)
    mfu = f" MFU {out['tflops'] / peak:6.1%} (of {peak:.0f} bf16)" if peak else ""
    out["mfu"] = out["tflops"] / peak if peak else None
    print(f"full iBOT step               : {f * 1e3:8.1f} ms/step ({min(full) * 1e3:.1f}-{max(full) * 1e3:.1f}) "
          f"{b_n / f:8.1f} img/s | {flops / b_n / 1e9:.1f} GFLOP/img {out['tflops']:.2f} TFLOP/s{mfu} "
          f"| first two steps {out['first_steps_s']:.1f} s", flush=True)

    if a.profile:
        p = profile_steps(ours, min(a.steps, log_every), device)
        out["profile"] = p
        print(f"profile: wall {p['wall_ms_per_step']:.1f} ms/step, {p['what']} {p['busy_ms_per_step']:.1f} ms/step "
              f"({p['busy_ms_per_step'] / p['wall_ms_per_step']:.0%} busy), {p['launches_per_step']:.0f} "
              f"{p['what']}/step, {p['syncs_per_step']:.1f} syncs/step waiting {p['sync_ms_per_step']:.1f} ms/step")
        for name, ms, share in p["top"]:
            print(f"    {ms:8.2f} ms/step {share:6.1%}  {name}")

    if not a.no_baseline:
        torch.manual_seed(0)
        base_student, _ = build_student_teacher(cfg)
        base_student.to(device).train()
        opt = torch.optim.AdamW(base_student.parameters(), lr=1e-4)
        dev = {k: v.to(device) for k, v in batch.items()}

        def baseline(i):
            g = normalize(dev["global_crops"].transpose(0, 1).flatten(0, 1), runner.mean, runner.std)
            loc = normalize(dev["local_crops"].transpose(0, 1).flatten(0, 1), runner.mean, runner.std)
            m = dev["masks"].transpose(0, 1).flatten(0, 1)
            with runner._autocast():
                cls_g, patch_g = base_student(g, mask=m)
                cls_l, _ = base_student(loc, patches=False) if c.local_crops_number else (cls_g[:0], None)
                loss = cls_g.float().logsumexp(-1).mean() + cls_l.float().logsumexp(-1).mean() + \
                    patch_g.float().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        base = timed_rounds(baseline, a.steps, a.rounds, device)
        b = statistics.median(base)
        out.update(baseline_ms_per_step=b * 1e3, full_over_baseline=f / b)
        print(f"baseline student-only update : {b * 1e3:8.1f} ms/step  {b_n / b:8.1f} img/s | full / baseline "
              f"{f / b:.2f}x", flush=True)
        del base_student, opt, dev

    if a.original:
        from benchmarks.original_ibot import OriginalStep

        del runner, student, teacher
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch.manual_seed(0)
        orig = OriginalStep(a.original, cfg, device)
        # its DataLoader's output: normalised float crops per crop (pinned on a GPU), bool masks per crop
        crops = [normalize(batch["global_crops"][:, i]) for i in range(c.global_crops_number)]
        crops += [normalize(batch["local_crops"][:, i]) for i in range(c.local_crops_number)]
        masks = [batch["masks"][:, i] for i in range(c.global_crops_number)]
        grid = c.local_crops_size // cfg.patch_size
        masks += [torch.zeros(b_n, grid, grid, dtype=torch.bool)] * c.local_crops_number  # unused, as there
        if device.type == "cuda":
            crops, masks = [t.pin_memory() for t in crops], [t.pin_memory() for t in masks]
        o_times = timed_rounds(lambda i: orig.step(crops, masks), a.steps, a.rounds, device)
        o = statistics.median(o_times)
        o_mfu = f" MFU {flops / o / 1e12 / peak:6.1%}" if peak else ""
        out.update(original_ms_per_step=o * 1e3, original_ms_range=[min(o_times) * 1e3, max(o_times) * 1e3],
                   original_img_per_s=b_n / o, speedup_vs_original=o / f)
        print(f"original iBOT step ({'fp16' if orig.fp16_scaler else 'fp32'})     : {o * 1e3:8.1f} ms/step "
              f"({min(o_times) * 1e3:.1f}-{max(o_times) * 1e3:.1f}) {b_n / o:8.1f} img/s{o_mfu} | ours is "
              f"{o / f:.2f}x faster", flush=True)
        del orig
        torch.distributed.destroy_process_group()  # the next batch size's step runs without one, as before
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("RESULT " + json.dumps(out), flush=True)
    if a.json:
        with open(a.json, "a") as fh:
            fh.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
