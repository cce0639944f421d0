"""The ``ibot-ray`` command line.

    ibot-ray pretrain [--config FILE|PRESET] [--set key=value ...] [--data SOURCE]
                      [--storage PATH_OR_URI] [--name RUN] [--address ADDR] [--verbose] [--takeover]
    ibot-ray config   [--config FILE|PRESET] [--set key=value ...]     print the resolved, validated config
    ibot-ray export   CHECKPOINT OUT [--which teacher|student]           timm-loadable safetensors backbone
    ibot-ray eval     MODEL --train SRC --val SRC [--config FILE|PRESET] [--set key=value ...]
                      [--device cpu|cuda|auto] [--max-images N] [--no-linear] [--no-baselines] [--json OUT]
                      k-NN, linear probe, raw-pixel and random-init baselines (docs/evaluating.md)
    ibot-ray tune     --space FILE|NAME [--config ...] [--set ...] [--trials N] [--max-concurrent M]
                      [--scheduler asha|fifo|pbt] [--objective knn_top1|loss] [--storage PATH] [--name SWEEP]
                      [--address ADDR] [--takeover]                        sweep with Ray Tune (docs/sweeps.md)

Ray is imported only by the commands that need it, so the method package stays usable without a cluster.
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config, preset_names


def _add_config_args(p: argparse.ArgumentParser, default: str | None, default_help: str | None = None) -> None:
    p.add_argument("--config", default=default,
                   help=f"YAML file or preset name ({', '.join(preset_names())}); default: {default_help or default}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set loss.teacher_temp=0.07 (repeatable)")


def _command(sub, name: str, summary: str, description: str, example: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` starts with what it does and one example, then lists its options."""
    return sub.add_parser(name, help=summary, description=f"{description}\n\nexample:\n{example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ibot-ray", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="iBOT self-supervised pretraining of Vision Transformers on Ray: your unlabelled images in, "
                    "a timm backbone out.",
        epilog="example:\n  ibot-ray pretrain                 # the demo: local Ray, shipped images, CPU, minutes\n"
               "run 'ibot-ray COMMAND --help' for what a command does and an example; guides: docs/")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(
        sub, "pretrain", "pretrain (or resume) a run on a local Ray or a cluster",
        "Pretrain a ViT with iBOT on a folder, Parquet files or a bucket of images (default: the shipped demo), on a\n"
        "local Ray or the cluster at --address. Without --config a preset is chosen for the images (their size and\n"
        "count, and the device) and printed with the reasons. Prints progress, a health verdict and, for labelled\n"
        "data (class subfolders, a label column), the teacher's k-NN on a held-out split beside the random-init and\n"
        "raw-pixel baselines of that split; writes checkpoints, metrics and the exported backbone under\n"
        "<storage>/<name>/ (name: the data's folder or file name). The same --storage and --name resume the run.\n"
        "Exit status: 0 done, 2 config error, 4 stopped on collapse, 5 an error a restart cannot fix.",
        "  ibot-ray pretrain --data ./my_images --set optim.epochs=10 --storage ./ibot_runs --name my_run")
    _add_config_args(p, None, "demo without --data; with --data, chosen from the images' size and count and the "
                              "device (printed with the reasons)")
    p.add_argument("--data", help="training source: folder, Parquet file/folder, s3:// or gs:// URI, or 'demo' "
                                  "(default: the preset's, 'demo')")
    p.add_argument("--storage", default=None,
                   help="run storage (local folder, shared file system or s3://...); default ./ibot_runs")
    p.add_argument("--name", default=None,
                   help="run name; the same storage and name resume the run (default: the data's folder or file "
                        "name, 'demo' for the demo)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own logs (worker output, Train/Data logs); default: they stay in Ray's "
                        "log folder, /tmp/ray/session_latest/logs for a local Ray")
    p.add_argument("--takeover", action="store_true",
                   help="take the run over from a driver known to be gone, without waiting for its lease to go stale "
                        "(one driver per run: docs/pretraining.md#resume)")

    p = _command(
        sub, "tune", "sweep hyperparameters with Ray Tune (ASHA early stopping)",
        "Sweep config fields (teacher temperatures, momentum schedules, recipe levers) with Ray Tune: each trial is a\n"
        "full pretraining run, ASHA stops the bad ones early on the online k-NN (or the loss). Writes results.csv,\n"
        "best_config.yaml and a plot; the same --storage and --name resume the sweep. Exit status: 0 done, 2 bad\n"
        "space or config, 3 interrupted (run it again). Guide: docs/sweeps.md.",
        "  ibot-ray tune --space demo_quick --config demo --trials 4 --set train.knn_every_epochs=1")
    p.add_argument("--space", required=True,
                   help="search space YAML, or a shipped space name (tau_momentum, tau_grid, demo_quick, demo_recipe)")
    _add_config_args(p, "demo")
    p.add_argument("--data", help="training source (same as --set data.source=...)")
    p.add_argument("--trials", type=int, default=None,
                   help="Tune samples; each grid combination runs this often (default: 1 for a grid, else 8)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: what the cluster's GPUs / CPUs fit)")
    p.add_argument("--scheduler", choices=["asha", "fifo", "pbt"], default="asha",
                   help="asha: early stopping (default); fifo: none; pbt: not supported (explains why)")
    p.add_argument("--objective", choices=["knn_top1", "loss"], default="knn_top1",
                   help="online k-NN top-1 on data.eval_source (max, default) or the training loss (min)")
    p.add_argument("--grace-epochs", type=float, default=1.0, help="ASHA grace period in epochs (default 1)")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA reduction factor (default 2)")
    p.add_argument("--max-failures", type=int, default=1, help="Tune retries of a failed trial (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random-search seed (default 0)")
    p.add_argument("--storage", default=None,
                   help="sweep storage (local folder or s3://...); default ./ibot_runs (the sweep: <storage>/<name>)")
    p.add_argument("--name", default=None, help="sweep name; the same storage + name resumes the sweep")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--out", default=None, help="folder for results.csv, best_config.yaml and the plot "
                                               "(default: the sweep folder when local)")
    p.add_argument("--verbose", action="store_true", help="also show Ray's own logs and Tune's trial results")
    p.add_argument("--takeover", action="store_true",
                   help="take the sweep over from a driver known to be gone, without waiting for its lease to go stale")

    p = _command(
        sub, "config", "print the resolved and validated config as YAML",
        "Resolve a config the way every command does (the defaults, then a preset or YAML file, then each --set)\n"
        "and print it as YAML; a bad value is one error naming the field (exit status 2). Nothing is started.",
        "  ibot-ray config --config demo --set optim.epochs=10 > my_config.yaml")
    _add_config_args(p, "vit_small_16")

    p = _command(
        sub, "export", "export a checkpoint's backbone as timm-loadable safetensors",
        "Write a checkpoint's teacher (or student) backbone as a .safetensors file that timm loads directly, with\n"
        "the architecture and its create_model arguments in the file's metadata (ibot_ray.load_backbone(OUT) reads\n"
        "them). CHECKPOINT may be local or in a bucket (s3://, gs://).",
        "  ibot-ray export ibot_runs/demo/step_00002232 demo_backbone.safetensors")
    p.add_argument("checkpoint", help="a state.pt checkpoint file or a Ray checkpoint folder holding one")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher")

    p = _command(
        sub, "eval", "k-NN, linear probe and baselines of a checkpoint, export or timm model",
        "Measure what a model learned on a labelled train/val pair (class folders or Parquet with a label column):\n"
        "a weighted k-NN (k=20, T=0.07) and a fixed linear probe on its frozen [CLS] features, beside two baselines\n"
        "on the same split: the raw-pixel k-NN and the same architecture at random init. Prints a table; --json\n"
        "writes every number. Guide: docs/evaluating.md.",
        "  ibot-ray eval ibot_runs/demo --train demo --val demo --json eval.json")
    p.add_argument("model", help="state.pt, a checkpoint folder, a run folder (latest step_*), an exported "
                                 ".safetensors file, or a timm model name (random init, never downloaded)")
    p.add_argument("--train", required=True, help="labelled train split (memory bank): class folders or Parquet")
    p.add_argument("--val", required=True, help="labelled val split (queries), same label space as --train")
    _add_config_args(p, None)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available; default)")
    p.add_argument("--max-images", type=int, default=None, help="cap each split (round-robin over classes)")
    p.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    p.add_argument("--no-baselines", action="store_true", help="skip the raw-pixel and random-init baselines")
    p.add_argument("--json", default=None, metavar="OUT", help="also write every number to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            cfg = load_config(args.config, args.overrides)
            sys.stdout.write(cfg.to_yaml())
            return 0
        if args.command == "export":
            from pathlib import Path

            from .export import export_from_checkpoint

            if "://" in args.checkpoint:  # a checkpoint in a bucket (s3://, gs://): fetch state.pt first
                import tempfile

                import pyarrow.fs as pafs

                from pipelines.storage import copy_from, resolve

                fs, path = resolve(args.checkpoint, setting="the checkpoint argument")  # retries transient errors
                if fs.get_file_info(path).type == pafs.FileType.Directory:
                    path = f"{path.rstrip('/')}/state.pt"
                with tempfile.TemporaryDirectory() as d:
                    local = Path(d) / "state.pt"
                    copy_from(fs, path, str(local))
                    out = export_from_checkpoint(local, args.out, which=args.which)
                print(f"wrote {out}")
                return 0
            ckpt = Path(args.checkpoint)
            if ckpt.is_dir():
                ckpt = ckpt / "state.pt"
            out = export_from_checkpoint(ckpt, args.out, which=args.which)
            print(f"wrote {out}")
            return 0
        if args.command == "eval":
            return _eval(args)
        if args.command == "pretrain":
            from pipelines.pretrain import run_pretrain

            try:
                result = run_pretrain(args.config, args.overrides, data=args.data, storage=args.storage,
                                      name=args.name, address=args.address, verbose=args.verbose,
                                      takeover=args.takeover)
            except Exception as e:
                from ray.train import TrainingFailedError

                from pipelines.failures import EXIT_FATAL, FatalTrainingError

                if not isinstance(e, (TrainingFailedError, FatalTrainingError)):
                    raise
                from pipelines.console import format_failure, ray_log_dir

                print(format_failure(e, ray_log_dir()), file=sys.stderr, flush=True)
                # EXIT_FATAL (5): an error every restart would raise again ended the run (pipelines/failures.py)
                return EXIT_FATAL if isinstance(e, FatalTrainingError) else 1
            return 4 if result.metrics.get("stopped_on_collapse") else 0  # 4: train.stop_on_collapse ended it
        if args.command == "tune":
            from tune.space import SpaceError
            from tune.sweep import SweepError, run_sweep

            overrides = list(args.overrides) + ([f"data.source={args.data}"] if args.data else [])
            try:
                result = run_sweep(args.space, config=args.config, overrides=overrides, trials=args.trials,
                                   max_concurrent=args.max_concurrent, scheduler=args.scheduler,
                                   objective=args.objective, storage=args.storage, name=args.name,
                                   address=args.address, grace_epochs=args.grace_epochs,
                                   reduction_factor=args.reduction_factor, max_failures=args.max_failures,
                                   seed=args.seed, out_dir=args.out, verbose=2 if args.verbose else 1,
                                   takeover=args.takeover)
            except (SpaceError, SweepError) as e:
                print(f"ibot-ray tune: {e}", file=sys.stderr)
                return 2
            return 0 if result.complete else 3  # 3: interrupted, run the same command again to resume
    except ConfigError as e:
        print(f"ibot-ray: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from pipelines.run_lease import RunInUseError
        from pipelines.storage import StorageConfigError, StorageUnavailableError

        if isinstance(e, (RunInUseError, StorageConfigError)):  # a second driver on a run; a storage setting
            print(f"ibot-ray: {e}", file=sys.stderr)
            return 2
        if isinstance(e, StorageUnavailableError):
            print(f"ibot-ray: {e}\nNothing was lost: run the same command again to resume.", file=sys.stderr)
            return 1
        raise
    return 1


def _eval(args: argparse.Namespace) -> int:
    from pipelines.evaluate import ModelLoadError, evaluate, format_table, load_model, write_json
    from pipelines.sources import SourceError

    from .checkpoint import CheckpointError

    if args.max_images is not None and args.max_images < 1:
        print("ibot-ray eval: --max-images must be >= 1", file=sys.stderr)
        return 2
    try:
        model = load_model(args.model, config=args.config, overrides=args.overrides)
        if model.kind == "checkpoint" and args.config:
            print(f"ibot-ray eval: note: --config {args.config} ignored, the checkpoint's own config is used "
                  "(--set still applies)", file=sys.stderr)
        if model.note:
            print(f"ibot-ray eval: note: {model.note}", file=sys.stderr)
        result = evaluate(model, args.train, args.val, device=args.device, max_images=args.max_images,
                          linear=not args.no_linear, baselines=not args.no_baselines)
    except (ModelLoadError, SourceError, CheckpointError) as e:
        print(f"ibot-ray eval: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
