"""The ``ibot-ray`` command line.

    ibot-ray pretrain [--config FILE|PRESET] [--set key=value ...] [--data SOURCE]
                      [--storage PATH_OR_URI] [--name RUN] [--address ADDR]
    ibot-ray config   [--config FILE|PRESET] [--set key=value ...]     print the resolved, validated config
    ibot-ray export   CHECKPOINT OUT [--which teacher|student]           timm-loadable safetensors backbone

Ray is imported only by the commands that need it, so the method package stays usable without a cluster.
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config, preset_names


def _add_config_args(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument("--config", default=default,
                   help=f"YAML file or preset name ({', '.join(preset_names())}); default: {default}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set loss.teacher_temp=0.07 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ibot-ray", description="iBOT self-supervised ViT pretraining on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="run (or resume) a pretraining run on a local or remote Ray cluster")
    _add_config_args(p, "demo")
    p.add_argument("--data", help="training source: folder, Parquet file/folder, s3:// or gs:// URI, or 'demo'")
    p.add_argument("--storage", default=None,
                   help="run storage (local folder, shared file system or s3://...); default ./ibot_runs")
    p.add_argument("--name", default=None, help="run name; the same name resumes (default: preset name)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")

    p = sub.add_parser("config", help="print the resolved and validated config as YAML")
    _add_config_args(p, "vit_small_16")

    p = sub.add_parser("export", help="export a checkpoint's backbone as timm-compatible safetensors")
    p.add_argument("checkpoint", help="a state.pt checkpoint file or a Ray checkpoint folder holding one")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--which", choices=["teacher", "student"], default="teacher")
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

            ckpt = Path(args.checkpoint)
            if ckpt.is_dir():
                ckpt = ckpt / "state.pt"
            out = export_from_checkpoint(ckpt, args.out, which=args.which)
            print(f"wrote {out}")
            return 0
        if args.command == "pretrain":
            overrides = list(args.overrides)
            if args.data:
                overrides.append(f"data.source={args.data}")
            cfg = load_config(args.config, overrides)  # validated before any cluster resource is requested
            from pipelines.pretrain import pretrain

            name = args.name or (args.config if args.config and "/" not in args.config else "run")
            pretrain(cfg, storage=args.storage, name=name, address=args.address)
            return 0
    except ConfigError as e:
        print(f"ibot-ray: config error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
