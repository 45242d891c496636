"""The ``vpeft`` command: ``demo``, ``train``, ``eval``, ``make-synthetic``.

``train`` / ``eval`` run recognition with a classifier (the Trainer) by default; with
``--task zero_shot|few_shot|base_to_novel|retrieval`` (config key ``task.name``) they
run a video-language task (:mod:`vpeft.tasks.runner`, one process).

Multi-GPU (or multi-process CPU) training runs under torchrun, e.g.::

    torchrun --nproc_per_node 8 --no-python vpeft train --config side4video_ssv2_b16 data.root=...

``train.batch_size`` is the global batch, so the same config gives the same schedule on
any number of processes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

log = logging.getLogger("vpeft")


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _config(args) -> dict:
    from .engine.config import load_config

    extra = {}
    model = {}
    if getattr(args, "pretrained", None):
        model["pretrained"] = args.pretrained
    if getattr(args, "checkpoint", None):
        model["checkpoint"] = args.checkpoint
    if model:
        extra["model"] = model
    if getattr(args, "output_dir", None):
        extra["output_dir"] = args.output_dir
    if getattr(args, "device", None):
        extra["device"] = args.device
    task = {}
    if getattr(args, "task", None):
        task["name"] = args.task
    if getattr(args, "adapters", None) and args.task not in (None, "recognition"):
        task["adapters"] = args.adapters
    if task:
        extra["task"] = task
    return load_config(args.config, args.overrides, extra=extra)


def _run_task(cfg, train: bool) -> int:
    """The video-language tasks (zero_shot, few_shot, base_to_novel, retrieval): single process."""
    from .tasks.runner import run_task

    _setup_logging(0)
    metrics = run_task(cfg, train=train)
    print(json.dumps(metrics))
    return 0


def cmd_train(args) -> int:
    from .engine import Trainer, init_distributed
    from .engine.distributed import cleanup

    cfg = _config(args)
    if cfg["task"]["name"] != "recognition":
        return _run_task(cfg, train=True)
    info = init_distributed(cfg["device"])
    _setup_logging(info.rank)
    try:
        resume = None
        if args.resume is not None:
            resume = args.resume or cfg["output_dir"]
        trainer = Trainer(cfg, info, resume=resume, progress=not args.no_progress)
        if info.is_main:
            trainer.model.print_trainable_parameters()
        summary = trainer.fit()
        if info.is_main:
            ev = summary["eval"]
            print(json.dumps({"steps": summary["steps"], "skipped_videos": summary["skipped_videos"],
                              "clips_per_s": round(summary["clips_per_s"], 2), "eval": ev}))
    finally:
        cleanup(info)
    return 0


def cmd_eval(args) -> int:
    from .engine import Trainer, init_distributed
    from .engine.distributed import cleanup

    cfg = _config(args)
    if cfg["task"]["name"] != "recognition":
        return _run_task(cfg, train=False)
    if not args.adapters:
        raise ValueError("vpeft eval needs --adapters PATH for task recognition")
    info = init_distributed(cfg["device"])
    _setup_logging(info.rank)
    try:
        trainer = Trainer(cfg, info, resume=args.adapters, progress=not args.no_progress, train=False)
        metrics = trainer.evaluate()
        if info.is_main:
            print(json.dumps(metrics))
    finally:
        cleanup(info)
    return 0


def cmd_make_synthetic(args) -> int:
    from .data.synthetic import write_synthetic

    paths = write_synthetic(args.out_dir, num_train=args.train, num_val=args.val, size=args.size,
                            frames=args.frames, seed=args.seed)
    print(json.dumps(paths, indent=2))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_demo(args.out, steps=args.steps, methods=args.methods, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .engine.config import preset_names

    p = argparse.ArgumentParser(prog="vpeft", description="Parameter-efficient video adaptation of open_clip "
                                "backbones: train, evaluate, demo, plan.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--config", required=True,
                        help=f"a YAML file or a preset name: {', '.join(preset_names())}")
        sp.add_argument("--pretrained", metavar="TAG", help="open_clip pretrained tag (needs network access)")
        sp.add_argument("--checkpoint", metavar="PATH", help="local backbone weights file (open_clip checkpoint)")
        sp.add_argument("--device", choices=["auto", "cpu"], help="run on the CPU even when CUDA is available")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
        sp.add_argument("--task", choices=["recognition", "zero_shot", "few_shot", "base_to_novel", "retrieval"],
                        help="config key task.name: recognition (classifier, default) or a video-language task")
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides such as train.lr=1e-4 model.options.preset=24x384")

    t = sub.add_parser("train", help="train an adapted backbone (torchrun for several processes)")
    common(t)
    t.add_argument("--output-dir", help="where logs and checkpoints go (config key output_dir)")
    t.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue from a checkpoint (default: the output directory's latest)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate trained adapter weights on data.val_list")
    common(e)
    e.add_argument("--adapters", metavar="PATH",
                   help="a run directory, checkpoint directory or adapter .safetensors file (required for "
                        "recognition; for the video-language tasks: an adapters.pt, or none to evaluate the "
                        "backbone as it is, e.g. zero-shot)")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("make-synthetic", help="write the synthetic motion dataset (mp4 files and list files)")
    s.add_argument("out_dir")
    s.add_argument("--train", type=int, default=800, help="training videos")
    s.add_argument("--val", type=int, default=240, help="validation videos")
    s.add_argument("--size", type=int, default=40, help="frame side in pixels")
    s.add_argument("--frames", type=int, default=16, help="frames per video")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_make_synthetic)

    d = sub.add_parser("demo", help="train and compare the methods on synthetic data (CPU, a few minutes)")
    d.add_argument("--out", default="vpeft-demo", help="directory for the data, runs, table and plot")
    d.add_argument("--steps", type=int, default=None, help="optimizer steps for every method (default: each method's own, see vpeft.demo.DEMO_METHODS)")
    d.add_argument("--methods", nargs="+", default=None, help="subset of: probe st_adapter msta side4video")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

    from .plan import add_estimate_parser, add_plan_parser

    add_plan_parser(sub)
    add_estimate_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``vpeft`` command."""
    from .data.lists import ListFileError
    from .engine.build import PretrainedUnavailable
    from .engine.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ListFileError, PretrainedUnavailable, FileNotFoundError, ValueError) as e:
        print(f"vpeft {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vpeft {args.command}: interrupted; the last checkpoint (if any) is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
