"""What a pretraining run learns: the real pipeline (Ray Data -> Ray Train) for a fixed budget on labelled data,
judged against the raw-pixel and random-initialisation baselines measured in the same run, on the same split.

    python benchmarks/quality.py [--data SRC] [--config PRESET] [--set key=value ...] [--val SRC] [--out DIR]
                                 [--name RUN] [--knn-every EPOCHS] [--eval-max-images N]

1. trains as ``ibot-ray pretrain`` does (``pipelines.pretrain.run_pretrain``: without ``--config`` the preset is the
   one chosen for the data), with the online k-NN of the teacher every ``--knn-every`` epochs on the run's own
   evaluation split (pipelines/eval_split.py: a labelled source's held-out split, or ``--val``; each split capped at
   ``--eval-max-images``);
2. evaluates the final teacher with ``ibot-ray eval``'s code (``pipelines.evaluate``) on that same split: weighted
   k-NN (k = 20, T = 0.07), the fixed linear probe, the raw-pixel k-NN and the random-init k-NN;
3. prints every figure and its ratio to the raw-pixel baseline, and writes ``<name>.json`` and ``<name>.png`` (the
   k-NN curve against both baselines of the same split, the losses and the run-health metrics) to ``--out``.

Without ``--data`` the config's own source is used (``demo``: the shipped Fashion-MNIST sample and its test split).
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from pathlib import Path


def _curve(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v:
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def plot(rows: list[dict], result: dict, steps_per_epoch: int, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ep = max(1, steps_per_epoch)
    ax = axes[0, 0]
    xs, ys = _curve(rows, "knn_top1")
    ax.plot([0] + [x / ep for x in xs], [result["random_init_knn"]["top1"]] + ys, "o-", label="teacher k-NN (online)")
    last = max([r["step"] for r in rows], default=0) / ep
    ax.plot([last], [result["knn"]["top1"]], "s", color="C3", label=f"final teacher ({result['knn']['top1']:.1f})")
    ax.axhline(result["pixel_knn"]["top1"], color="k", ls="--", label=f"raw pixels ({result['pixel_knn']['top1']:.1f})")
    ax.axhline(result["random_init_knn"]["top1"], color="gray", ls=":",
               label=f"random init ({result['random_init_knn']['top1']:.1f})")
    ax.set(xlabel="epoch", ylabel="k-NN top-1 (%)",
           title=textwrap.fill(f"k-NN of the teacher [CLS], all on the {result['split']}", 70))
    ax.title.set_fontsize(8)
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    for key in ("loss", "cls", "mim"):
        xs, ys = _curve(rows, key)
        ax.plot([x / ep for x in xs], ys, label=key)
    ax.set(xlabel="epoch", title="loss")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    for key, label in (("teacher_entropy_frac", "[CLS] target entropy / ln K"),
                       ("teacher_patch_entropy_frac", "patch target entropy / ln K"),
                       ("teacher_batch_entropy_frac", "batch-mean target entropy / ln K")):
        xs, ys = _curve(rows, key)
        ax.plot([x / ep for x in xs], ys, label=label)
    ax.axhline(0.95, color="r", ls=":", lw=0.8, label="uniform-collapse line")
    ax.set(xlabel="epoch", ylim=(0, 1.02), title="teacher targets")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    for key, label in (("feature_std", "feature spread (1 = random directions)"), ("cls_kl", "KL(teacher||student)")):
        xs, ys = _curve(rows, key)
        ax.plot([x / ep for x in xs], ys, label=label)
    ax.axhline(0.1, color="r", ls=":", lw=0.8, label="representation-collapse line")
    ax.set(xlabel="epoch", title="features and KL")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="preset or YAML (default: chosen for --data, else demo)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--data", "--train", dest="data", default=None,
                    help="training source (default: the config's data.source); a labelled one is judged on its own "
                         "held-out split unless --val is given")
    ap.add_argument("--val", default=None, help="labelled split to judge on instead (data.eval_source)")
    ap.add_argument("--out", default="bench_results/quality")
    ap.add_argument("--name", default=None)
    ap.add_argument("--knn-every", type=int, default=1, help="online k-NN every N epochs")
    ap.add_argument("--eval-max-images", type=int, default=None,
                    help="cap of each evaluation split (data.eval_max_images; default: the config's)")
    ap.add_argument("--address", default=None)
    a = ap.parse_args(argv)

    from pipelines.evaluate import evaluate, load_model
    from pipelines.metrics import read_metrics
    from pipelines.pretrain import run_name_for, run_pretrain

    overrides = list(a.overrides) + [f"train.knn_every_epochs={a.knn_every}"]
    if a.val:
        overrides.append(f"data.eval_source={a.val}")
    if a.eval_max_images:
        overrides.append(f"data.eval_max_images={a.eval_max_images}")
    name = a.name or f"quality_{run_name_for(a.data) if a.data else Path(a.config or 'demo').stem}"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    run = run_pretrain(a.config, overrides, data=a.data, storage=str(out / "runs"), name=name, address=a.address)
    train_s = time.time() - t0
    plan = run.eval_plan
    if not plan.enabled:
        raise SystemExit(f"quality.py: nothing to judge on: {plan.why_none}")
    model = load_model(run.run_path)
    result = evaluate(model, plan.bank, plan.queries, device="auto")
    result["split"] = plan.split
    rows = [r for r in read_metrics(Path(run.run_path) / "logs" / "metrics.jsonl") if "step" in r]
    cfg = model.cfg
    steps_per_epoch = max(1, run.steps // max(1, cfg.optim.epochs))

    knn, pix, rnd, lin = result["knn"], result["pixel_knn"], result["random_init_knn"], result["linear"]
    curve = [(round(r["step"] / steps_per_epoch, 2), r["knn_top1"]) for r in rows if "knn_top1" in r]
    last = next((r for r in reversed(rows) if "teacher_entropy_frac" in r), {})
    summary = {
        "config": a.config, "data": a.data, "overrides": a.overrides, "split": plan.split,
        "bank_images": len(plan.bank), "query_images": len(plan.queries),
        "steps": run.steps, "train_wall_s": round(train_s, 1),
        "pixel_knn_top1": pix["top1"], "pixel_variant": pix["variant"],
        "random_init_knn_top1": rnd["top1"],
        "knn_top1": knn["top1"], "knn_top5": knn["top5"], "linear_top1": lin["top1"] if lin else None,
        "knn_over_pixel_ratio": knn["top1"] / pix["top1"], "knn_over_random_ratio": knn["top1"] / rnd["top1"],
        "online_knn_by_epoch": curve,
        "health": {k: last.get(k) for k in ("health", "teacher_entropy_frac", "prototypes_used", "cls_kl",
                                            "feature_std")},
        "evaluation": result,
    }
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2, default=str))
    png = out / f"{name}.png"
    plot(rows, result, steps_per_epoch,
         f"{a.config or 'chosen preset'} {' '.join(a.overrides)}: {run.steps} steps in {train_s / 60:.1f} min; "
         f"k-NN {knn['top1']:.1f} vs pixels {pix['top1']:.1f}", png)

    print(f"\nquality: {a.config or 'the chosen preset'} {' '.join(a.overrides)} on {a.data or cfg.data.source}")
    print(f"  judged on the {plan.split}: bank {len(plan.bank)}, queries {len(plan.queries)} images")
    print(f"  trained {run.steps} steps in {train_s:.0f} s (driver wall, Ray start and the driver's k-NN included)")
    print(f"  {'':34} {'top-1':>7} {'vs pixels':>10}")
    print(f"  {'raw-pixel k-NN (' + pix['variant'] + ')':34} {pix['top1']:7.2f} {1.0:9.2f}x")
    print(f"  {'random-init k-NN':34} {rnd['top1']:7.2f} {rnd['top1'] / pix['top1']:9.2f}x")
    print(f"  {'trained teacher k-NN':34} {knn['top1']:7.2f} {knn['top1'] / pix['top1']:9.2f}x")
    if lin:
        print(f"  {'trained teacher linear probe':34} {lin['top1']:7.2f} {lin['top1'] / pix['top1']:9.2f}x")
    print("  online k-NN by epoch: " + ", ".join(f"{e:g}: {v:.1f}" for e, v in curve))
    print(f"  health at the end: {summary['health']}")
    print(f"  wrote {out / (name + '.json')} and {png}")
    return summary


if __name__ == "__main__":
    main()
