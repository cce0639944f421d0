"""What a pretraining run learns: the real pipeline (Ray Data -> Ray Train) for a fixed budget on a labelled dataset,
judged against the raw-pixel and random-initialisation baselines measured in the same run.

    python benchmarks/quality.py [--config demo] [--set key=value ...] [--train SRC --val SRC] [--out DIR]
                                 [--name RUN] [--knn-every EPOCHS] [--eval-max-images N]

1. trains with ``ibot-ray pretrain``'s own driver (``pipelines.pretrain.pretrain``), the online k-NN of the teacher on
   the labelled splits after every ``--knn-every`` epochs (bank and queries capped at ``--eval-max-images``);
2. evaluates the final teacher with ``ibot-ray eval``'s code (``pipelines.evaluate``) on the full splits: weighted
   k-NN (k = 20, T = 0.07), the fixed linear probe, the raw-pixel k-NN and the random-init k-NN;
3. prints every figure and its ratio to the raw-pixel baseline, and writes ``quality.json`` and ``quality.png`` (the
   k-NN curve against both baselines, the losses and the run-health metrics) to ``--out``.

Without ``--train``/``--val`` the config's own sources are used (``demo``: the shipped Fashion-MNIST sample).
"""

from __future__ import annotations

import argparse
import json
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
    ax.plot([0] + [x / ep for x in xs], [result["random_init_knn"]["top1"]] + ys, "o-", label="teacher k-NN")
    ax.axhline(result["pixel_knn"]["top1"], color="k", ls="--", label=f"raw pixels ({result['pixel_knn']['top1']:.1f})")
    ax.axhline(result["random_init_knn"]["top1"], color="gray", ls=":",
               label=f"random init ({result['random_init_knn']['top1']:.1f})")
    ax.set(xlabel="epoch", ylabel="k-NN top-1 (%)", title="k-NN of the teacher [CLS]")
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
    ap.add_argument("--config", default="demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--train", default=None, help="labelled training split (default: the config's data.source)")
    ap.add_argument("--val", default=None, help="labelled held-out split (default: the config's data.eval_source)")
    ap.add_argument("--out", default="bench_results/quality")
    ap.add_argument("--name", default=None)
    ap.add_argument("--knn-every", type=int, default=1, help="online k-NN every N epochs")
    ap.add_argument("--eval-max-images", type=int, default=10000, help="cap of each split for the online k-NN")
    ap.add_argument("--address", default=None)
    a = ap.parse_args(argv)

    from ibot_ray.config import load_config
    from pipelines.evaluate import evaluate, load_model
    from pipelines.metrics import read_metrics
    from pipelines.pretrain import pretrain
    from pipelines.sources import resolve_source

    overrides = list(a.overrides)
    if a.train:
        overrides.append(f"data.source={a.train}")
    if a.val:
        overrides.append(f"data.eval_source={a.val}")
    overrides += [f"train.knn_every_epochs={a.knn_every}", f"data.eval_max_images={a.eval_max_images}"]
    cfg = load_config(a.config, overrides)
    if not cfg.data.eval_source:
        raise SystemExit("quality.py: needs a labelled held-out split (--val or data.eval_source)")
    train_src = resolve_source(cfg.data.eval_train_source or cfg.data.source, "train")
    val_src = resolve_source(cfg.data.eval_source, "test")
    name = a.name or f"quality_{Path(a.config).stem}"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    run = pretrain(cfg, storage=str(out / "runs"), name=name, address=a.address, knn=False, export=False)
    train_s = time.time() - t0
    model = load_model(run.run_path)
    result = evaluate(model, train_src, val_src, device="auto")
    rows = [r for r in read_metrics(Path(run.run_path) / "logs" / "metrics.jsonl") if "step" in r]
    steps_per_epoch = max(1, run.steps // max(1, cfg.optim.epochs))

    knn, pix, rnd, lin = result["knn"], result["pixel_knn"], result["random_init_knn"], result["linear"]
    curve = [(round(r["step"] / steps_per_epoch, 2), r["knn_top1"]) for r in rows if "knn_top1" in r]
    last = next((r for r in reversed(rows) if "teacher_entropy_frac" in r), {})
    summary = {
        "config": a.config, "overrides": a.overrides, "train": train_src, "val": val_src,
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
         f"{a.config} {' '.join(a.overrides)}: {run.steps} steps in {train_s / 60:.1f} min; "
         f"k-NN {knn['top1']:.1f} vs pixels {pix['top1']:.1f}", png)

    print(f"\nquality: {a.config} {' '.join(a.overrides)} on {train_src} -> {val_src}")
    print(f"  trained {run.steps} steps in {train_s:.0f} s (driver wall, Ray start included)")
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
