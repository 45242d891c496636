"""The ``vpeft`` command: ``demo``, ``train``, ``eval``, ``predict``, ``make-synthetic``.

``train`` / ``eval`` run recognition with a classifier by default; with
``--task zero_shot|few_shot|base_to_novel|retrieval`` (config key ``task.name``) they
run a video-language task (:mod:`vpeft.tasks`). Every task runs in the same engine
(:class:`vpeft.engine.Trainer`): torchrun, precision, accumulation, checkpoints and
``--resume`` work the same for all of them.

Multi-GPU (or multi-process CPU) training runs under torchrun, e.g.::

    torchrun --nproc_per_node 8 --no-python vpeft train --config side4video_ssv2_b16 data.root=...

``train.batch_size`` is the global batch, so the same config gives the same schedule on
any number of processes.

``KEY=VALUE`` config overrides may appear anywhere on the command line (before or after
options). Start-up is light: torch and the model code are imported only by the
subcommands that need them, so ``vpeft --help`` and argument errors are immediate.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from typing import List, Optional, Tuple

log = logging.getLogger("vpeft")


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _config(args, check: bool = True) -> dict:
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
    if getattr(args, "strict_data", False):
        extra["data"] = {"strict": True}
    if getattr(args, "device", None):
        extra["device"] = args.device
    if getattr(args, "task", None):
        extra["task"] = {"name": args.task}
    cfg = load_config(args.config, args.overrides, extra=extra, resolve_output_dir=False, check=check)
    if cfg["output_dir"] is None:
        from .engine.rundir import default_output_dir, latest_run

        previous = latest_run(args.config) if getattr(args, "resume", None) in ("", "require") else None
        cfg["output_dir"] = previous or default_output_dir(args.config)
    return cfg


def _trainer(cfg, info, args, **kwargs):
    """The engine's Trainer with the task ``task.name`` (recognition or a video-language task)."""
    from .engine import Trainer
    from .tasks import build_task

    return Trainer(cfg, info, task=build_task(cfg, info), progress=not args.no_progress, **kwargs)


def cmd_train(args) -> int:
    from .engine.config import validate

    cfg = _config(args, check=False)
    if os.environ.get("RANK", "0") == "0":
        from .engine.rundir import claim   # refuse a locked or used output_dir before loading torch and the model

        claim(cfg["output_dir"], resume=args.resume is not None, overwrite=args.overwrite, check_only=True)
    validate(cfg)
    from .engine import init_distributed
    from .engine.distributed import cleanup

    info = init_distributed(cfg["device"])
    _setup_logging(info.rank)
    try:
        resume, required = None, True
        if args.resume is not None:   # --resume: continue output_dir if it has a checkpoint; =require: must
            resume = cfg["output_dir"] if args.resume in ("", "require") else args.resume
            required = args.resume != ""
        trainer = _trainer(cfg, info, args, resume=resume, overwrite=args.overwrite, require_checkpoint=required)
        if info.is_main:
            trainer.video_model.print_trainable_parameters()
        summary = trainer.fit()
        if info.is_main:
            ev = summary["eval"]
            print(json.dumps({"task": cfg["task"]["name"], "steps": summary["steps"],
                              "skipped_videos": summary["skipped_videos"],
                              "clips_per_s": round(summary["clips_per_s"], 2), "eval": ev}))
    finally:
        cleanup(info)
    return 0


def cmd_eval(args) -> int:
    from .engine import init_distributed
    from .engine.distributed import cleanup

    cfg = _config(args)
    adapters = args.adapters or cfg["task"]["adapters"]
    if not adapters and cfg["task"]["name"] != "zero_shot":
        raise ValueError(f"vpeft eval needs --adapters PATH for task {cfg['task']['name']} (only zero_shot can "
                         "evaluate the backbone as it is)")
    info = init_distributed(cfg["device"])
    _setup_logging(info.rank)
    try:
        trainer = _trainer(cfg, info, args, resume=adapters, train=False)
        metrics = trainer.evaluate()
        if info.is_main:
            print(json.dumps(metrics))
    finally:
        cleanup(info)
    return 0


def cmd_predict(args) -> int:
    from .predict import predict

    try:
        clips, crops = (int(x) for x in args.views.lower().split("x"))
    except ValueError:
        raise ValueError(f"--views {args.views!r}: expected CLIPSxCROPS such as 1x1 or 4x3") from None
    records = predict(args.videos, args.adapters, topk=args.topk, clips=clips, crops=crops, device=args.device)
    for r in records:
        if args.json:
            print(json.dumps(r))
        elif "error" in r:
            print(f"{r['video']}: skipped: {r['error']}", file=sys.stderr)
        else:
            print(f"{r['video']}: " + ", ".join(f"{c} {100 * p:.1f}%" for c, p in r["top"]))
    bad = [r["video"] for r in records if "error" in r]
    if bad and not args.json:
        print(f"vpeft predict: {len(bad)} of {len(records)} video(s) could not be read: {bad}", file=sys.stderr)
    return 1 if len(bad) == len(records) else 0


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


_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")
_WITH_OVERRIDES = ("train", "eval")


def split_overrides(argv: List[str]) -> Tuple[List[str], List[str]]:
    """``(other arguments, KEY=VALUE overrides)``: overrides may stand anywhere on the line
    (``--resume train.lr=1e-4`` is not a resume path). Everything after ``--`` is left alone."""
    rest, overrides = [], []
    for i, a in enumerate(argv):
        if a == "--":
            rest += argv[i:]
            break
        (overrides if _OVERRIDE.match(a) else rest).append(a)
    return rest, overrides


def _command(argv: List[str]) -> Optional[str]:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(full: bool = True) -> argparse.ArgumentParser:
    """The argument parser. With ``full=False`` the ``plan`` subcommand is only listed
    (its option choices need torch); :func:`main` builds it fully when ``plan`` runs."""
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
        sp.add_argument("--strict-data", action="store_true",
                        help="an unreadable evaluation video is an error (config key data.strict); by default it "
                             "is excluded, named and counted (videos_skipped)")
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides such as train.lr=1e-4 model.options.preset=24x384 (anywhere on the "
                             "command line)")

    t = sub.add_parser("train", help="train an adapted backbone (torchrun for several processes)")
    common(t)
    t.add_argument("--output-dir", help="where logs and checkpoints go (config key output_dir)")
    t.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH|require",
                   help="continue from the output directory's latest verified checkpoint, or start fresh (and say "
                        "so) when there is none yet; --resume=require: a missing checkpoint is an error; "
                        "--resume PATH: continue from that run or checkpoint directory. Without --output-dir: the "
                        "newest runs/<config>-<timestamp> directory")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in the output directory (otherwise a new run there is refused)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate trained adapter weights on data.val_list")
    common(e)
    e.add_argument("--adapters", metavar="PATH",
                   help="a run directory, checkpoint directory or save_pretrained directory (required except "
                        "for zero_shot, which can evaluate the backbone as it is)")
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="top-k classes of video files with trained weights")
    pr.add_argument("videos", nargs="+", metavar="VIDEO")
    pr.add_argument("--adapters", required=True, metavar="DIR",
                    help="a save_pretrained directory, a checkpoint directory or a run directory")
    pr.add_argument("--topk", type=int, default=5)
    pr.add_argument("--views", default="1x1", metavar="CLIPSxCROPS", help="test views per video, e.g. 4x3")
    pr.add_argument("--json", action="store_true", help="one JSON object per video")
    pr.add_argument("--device", default=None, help="cpu or cuda (default: where the model is built)")
    pr.set_defaults(func=cmd_predict)

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

    # ---- vpeft selftest (issue 16): fused kernels vs eager on this machine's GPU
    st = sub.add_parser("selftest", help="check the fused kernels' numbers and speed on this GPU "
                        "(interpreter checks without one)")
    st.add_argument("--json", help="write the results here (default $OUT/selftest.json or ./selftest.json)")
    st.add_argument("--no-timing", action="store_true", help="numerics only")
    st.set_defaults(func=lambda a: __import__("vpeft_kernels.selftest", fromlist=["run"]).run(a),
                    interpreter_checks=False)
    # ---- end selftest

    if full:
        from .plan import add_estimate_parser, add_plan_parser

        add_plan_parser(sub)
        add_estimate_parser(sub)
    else:
        sub.add_parser("plan", help="largest batch that fits a GPU memory budget (see vpeft plan --help)")
        sub.add_parser("estimate", help="estimated GPU memory of one training step (see vpeft estimate --help)")

    from .data.annotations import add_prepare_data_parser   # vpeft prepare-data (dataset annotation files)

    add_prepare_data_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``vpeft`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command(argv)
    rest, overrides = split_overrides(argv) if command in _WITH_OVERRIDES else (argv, [])
    parser = build_parser(full=command in ("plan", "estimate"))
    args = parser.parse_args(rest)
    if command in _WITH_OVERRIDES:
        args.overrides = list(args.overrides) + overrides
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - only the user-facing kinds are turned into one line
        kind = _user_error(e)
        if kind is None:
            raise
        print(f"vpeft {args.command}: error: {e}", file=sys.stderr)
        return kind
    except KeyboardInterrupt:
        print(f"vpeft {args.command}: interrupted; the last checkpoint (if any) is intact", file=sys.stderr)
        return 130


def _user_error(e: BaseException) -> Optional[int]:
    """The exit status for an error a user can act on (printed as one line), else None."""
    mod = sys.modules.get
    if isinstance(e, (ValueError, FileNotFoundError)):   # ConfigError, ListFileError, CheckpointError, ...
        return 2
    unavailable = getattr(mod("vpeft.backbones.build"), "PretrainedUnavailable", None)
    if unavailable is not None and isinstance(e, unavailable):
        return 2
    kinds = [getattr(mod("vpeft.data.video"), "VideoDecodeError", None),
             getattr(mod("vpeft.engine.checkpoint"), "CheckpointWriteError", None),
             getattr(mod("vpeft.engine.trainer"), "NonFiniteError", None)]
    if any(k is not None and isinstance(e, k) for k in kinds):
        return 1
    return None


if __name__ == "__main__":
    sys.exit(main())
