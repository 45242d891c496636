"""Run configuration: nested sections with defaults, YAML files, ``key=value`` overrides.

Every key a run can set is declared here with its default; an unknown key anywhere
(YAML or override) is an error that lists the keys the section has. This module (the
schema and :class:`ConfigError`) imports nothing else of vpeft, so every layer can use
it; checks that need the method registry or files happen where the run is built
(:mod:`vpeft.engine.build`, the tasks).
"""
from __future__ import annotations

import copy
import json
import os
from importlib import resources
from typing import Any, Dict, List, Optional, Sequence

import yaml

DEFAULTS: Dict[str, Dict[str, Any]] = {
    "model": {
        "backbone": "ViT-B-16",      # open_clip model name, or a vpeft tiny config (see vpeft.engine.build)
        "pretrained": None,          # open_clip pretrained tag (needs network access)
        "checkpoint": None,          # local backbone weights file (the offline way to pretrained weights)
        "method": "st_adapter",      # a registered method (vpeft.methods.method_names())
        "options": {},               # keyword options of vpeft.adapt for the method
        "num_frames": 8,             # T, frames per clip the model is built for
        "dropout": 0.5,              # classifier dropout
    },
    "data": {
        "root": None,                # directory the list files' paths are relative to
        "train_list": None,          # "path label" lines or CSV with a header
        "val_list": None,
        "class_names": None,         # one name per line (optional when num_classes is set)
        "num_classes": None,         # default: the number of class names
        "num_frames": None,          # frames the loader samples; must equal model.num_frames if set
        "sampling": "segment",       # "segment" or "dense"
        "stride": 1,                 # dense sampling stride
        "test_clips": 1,             # temporal views per video at evaluation
        "test_crops": 1,             # spatial views per clip at evaluation (1 or 3)
        "test_resize": None,         # short side before test crops (default: image size)
        "crop_scale": [0.25, 1.0],   # random resized crop area range
        "flip": 0.5,                 # horizontal flip probability (0 for direction-sensitive data)
        "flip_label_map": None,      # {label: label after flip} or a JSON file of it
        "color_jitter": 0.0,         # brightness/contrast/saturation strength
        "grayscale": 0.0,            # probability of a grayscale clip
        "num_workers": 2,            # loader worker processes per rank
        "max_replacements": 20,      # training: other videos tried when one cannot be decoded
        "strict": False,             # evaluation: an unreadable video is an error (--strict-data) instead of
                                     # being excluded, named and counted (videos_skipped)
        "decoder": "auto",           # auto (decord, torchcodec, pyav: first that loads and opens), or one of them
        "frame_template": "img_{:05d}.jpg",  # file names in frame-folder samples (str.format of the frame number)
        "frame_start_index": 1,      # number of a frame folder's first image
        "min_frames": 1,             # a video with fewer frames is skipped as too short
        "resize": "auto",            # auto (the backbone's own: bicubic for open_clip), bicubic or bilinear
    },
    "train": {
        "epochs": 30,
        "max_steps": None,           # stop after this many optimizer steps (None: epochs decide)
        "batch_size": 64,            # global batch per optimizer step (all ranks, all accumulation steps)
        "grad_accum": 1,             # micro-batches per optimizer step
        "lr": 1e-3,
        "min_lr": 1e-5,              # end of the cosine
        "warmup_epochs": 2.0,        # linear warm-up length (fraction of an epoch allowed)
        "weight_decay": 0.05,
        "betas": [0.9, 0.999],
        "label_smoothing": 0.1,
        "clip_grad": None,           # max gradient norm (None: no clipping)
        "precision": "auto",         # auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16
        "activation_checkpointing": False,
        "seed": 0,
        "eval_every": 1,             # epochs between evaluations (0: only at the end)
        "log_every": 10,             # optimizer steps between log lines
        "checkpoint_every": 0,       # optimizer steps between checkpoints (0: at each epoch end)
        "keep_checkpoints": 2,
        "stop_at_step": None,        # end this invocation after this step (schedule unchanged; continue with --resume)
    },
    "task": {
        "name": "recognition",       # recognition (classifier head, the Trainer) or a video-language task:
                                     # zero_shot, few_shot, base_to_novel, retrieval (vpeft.tasks)
        "template": "a video of {}", # class prompt (video-language recognition tasks)
        "shots": None,               # K videos per class (few_shot; base_to_novel: null = all base videos)
        "seed": 0,                   # seed of the K-shot draw
        "splits": [],                # zero_shot: class-split files (class indices, one per line)
        "eval_class_names": None,    # zero_shot: class names of the evaluated classes (default data.class_names)
        "base_classes": None,        # base_to_novel: file of base class indices (default: the first half)
        "spatial_descriptions": None,   # MSTA consistency loss: JSON class index -> list of descriptions
        "temporal_descriptions": None,
        "alpha": 1.0,                # weight of the consistency loss
        "train_text": False,         # retrieval: also fine-tune the text tower
        "text_lr": 1e-7,             # retrieval: lr of the text tower when train_text
        "adapters": None,            # trained weights (a run, checkpoint or save_pretrained directory) to evaluate
    },
    "output_dir": None,              # default: runs/<config name>-<timestamp>, a new directory per run
    "tensorboard": True,
    "device": "auto",                # auto (CUDA when available) or cpu
}

SECTIONS = ("model", "data", "train", "task")
DECODERS = ("decord", "torchcodec", "pyav")
"""``data.decoder`` backends, in the order ``auto`` tries them (:mod:`vpeft.data.video`)."""
DECODER_CHOICES = ("auto",) + DECODERS
INTERPOLATIONS = ("bicubic", "bilinear")
"""``data.resize`` interpolations besides ``auto`` (:mod:`vpeft.data.transforms`)."""
TASK_NAMES = ("recognition", "zero_shot", "few_shot", "base_to_novel", "retrieval")
"""``task.name`` values: recognition (:mod:`vpeft.engine.task`) and the video-language tasks (:mod:`vpeft.tasks`)."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what was expected."""


def _merge(base: Dict[str, Any], new: Dict[str, Any], where: str) -> None:
    for key, value in new.items():
        if key not in base:
            raise ConfigError(f"unknown config key '{where}{key}'; {where.rstrip('.') or 'the top level'} "
                              f"has {sorted(base)}")
        if isinstance(base[key], dict) and key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"config section {key!r} must be a mapping, got {value!r}")
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = copy.deepcopy(value)


def preset_names() -> List[str]:
    """Names of the YAML presets shipped in ``vpeft/configs``."""
    return sorted(p.name[:-5] for p in resources.files("vpeft.configs").iterdir()
                  if p.name.endswith(".yaml") and not p.name.startswith("_"))


def _safe_load(text: str, where: str) -> Any:
    """``yaml.safe_load`` with a syntax error as one line: ``where:line:column: problem``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        pos = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        raise ConfigError(f"{where}{pos}: malformed YAML: {problem}" + (f" ({context})" if context else "")) from None


def _read_yaml(path_or_name: str) -> Dict[str, Any]:
    if os.path.isfile(path_or_name):
        try:
            with open(path_or_name) as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path_or_name} cannot be read: {e}") from None
        data = _safe_load(text, path_or_name) or {}
    else:
        name = os.path.basename(path_or_name)
        name = name[:-5] if name.endswith(".yaml") else name
        if name not in preset_names() and not (name.startswith("_") and
                                                resources.files("vpeft.configs").joinpath(name + ".yaml").is_file()):
            raise ConfigError(f"config {path_or_name!r} is neither a file nor a preset; presets: {preset_names()}")
        data = _safe_load(resources.files("vpeft.configs").joinpath(name + ".yaml").read_text(), name + ".yaml") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path_or_name!r} must be a YAML mapping, got {type(data).__name__}")
    return data


def parse_override(text: str) -> Dict[str, Any]:
    """``"train.lr=1e-3"`` -> ``{"train": {"lr": 0.001}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r} has an empty key")
    value = _safe_load(raw, f"override {text!r}") if raw.strip() else None
    out: Dict[str, Any] = value
    for p in reversed(parts):
        out = {p: out}
    return out


def load_config(path_or_name: Optional[str] = None, overrides: Sequence[str] = (),
                extra: Optional[Dict[str, Any]] = None, *, resolve_output_dir: bool = True,
                check: bool = True) -> Dict[str, Any]:
    """Defaults, then the YAML file or preset (presets may name a ``base`` preset), then
    ``extra`` (a nested dict), then the ``key=value`` overrides; validated.

    An unset ``output_dir`` becomes ``runs/<config name>-<timestamp>`` (a new directory
    per run) unless ``resolve_output_dir=False`` (then it stays None). ``check=False``
    leaves out :func:`validate` (which imports the model code) for the caller to run.
    """
    cfg = copy.deepcopy(DEFAULTS)
    layers: List[Dict[str, Any]] = []
    if path_or_name:
        data = _read_yaml(path_or_name)
        seen = {path_or_name}
        while "base" in data:
            base = data.pop("base")
            if base in seen:
                raise ConfigError(f"config base chain loops at {base!r}")
            seen.add(base)
            layers.insert(0, data)
            data = _read_yaml(base)
        layers.insert(0, data)
    for layer in layers:
        _merge(cfg, layer, "")
    if extra:
        _merge(cfg, extra, "")
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if key.startswith("model.options.") and "=" in o:   # one option of the method: merge, not replace
            cfg["model"]["options"] = {**cfg["model"]["options"], **parse_override(o)["model"]["options"]}
        else:
            _merge(cfg, parse_override(o), "")
    if check:
        validate(cfg)
    if cfg["output_dir"] is None and resolve_output_dir:
        from .rundir import default_output_dir

        cfg["output_dir"] = default_output_dir(path_or_name)
    return cfg


def validate(cfg: Dict[str, Any]) -> None:
    """Check types and cross-key constraints that do not need files or a model."""
    m, d, t = cfg["model"], cfg["data"], cfg["train"]
    if not isinstance(m["method"], str) or not m["method"]:
        raise ConfigError(f"model.method must be a method name, got {m['method']!r}")
    if not isinstance(m["options"], dict):
        raise ConfigError(f"model.options must be a mapping, got {m['options']!r}")
    for sec, key in (("model", "num_frames"), ("train", "batch_size"), ("train", "grad_accum"),
                     ("train", "epochs"), ("data", "stride"), ("data", "test_clips")):
        v = cfg[sec][key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{sec}.{key} must be a positive integer, got {v!r}")
    for sec, key, low, optional in (("train", "log_every", 1, False), ("train", "keep_checkpoints", 1, False),
                                    ("train", "eval_every", 0, False), ("train", "checkpoint_every", 0, False),
                                    ("train", "seed", 0, False), ("data", "num_workers", 0, False),
                                    ("data", "max_replacements", 0, False), ("train", "stop_at_step", 1, True),
                                    ("data", "num_classes", 1, True)):
        v = cfg[sec][key]   # a fraction or a string where a count is meant would be truncated or fail late
        if not (optional and v is None) and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            raise ConfigError(f"{sec}.{key} must be an integer >= {low}{' or null' if optional else ''}, got {v!r}")
    if d["num_frames"] is not None and d["num_frames"] != m["num_frames"]:
        raise ConfigError(f"data.num_frames={d['num_frames']} does not match model.num_frames={m['num_frames']}: "
                          "the model is built for a fixed number of frames")
    if d["sampling"] not in ("segment", "dense"):
        raise ConfigError(f"data.sampling={d['sampling']!r}; expected 'segment' or 'dense'")
    if d["test_crops"] not in (1, 3):
        raise ConfigError(f"data.test_crops={d['test_crops']!r}; expected 1 or 3")
    _validate_decoding(d)
    if t["precision"] not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision={t['precision']!r}; expected auto, fp32, bf16 or fp16")
    if t["max_steps"] is not None and (not isinstance(t["max_steps"], int) or t["max_steps"] < 1):
        raise ConfigError(f"train.max_steps must be a positive integer or null, got {t['max_steps']!r}")
    if t["batch_size"] % t["grad_accum"]:
        raise ConfigError(f"train.batch_size={t['batch_size']} is not divisible by train.grad_accum={t['grad_accum']}")
    cs = d["crop_scale"]
    if not (isinstance(cs, (list, tuple)) and len(cs) == 2 and 0 < float(cs[0]) <= float(cs[1]) <= 1):
        raise ConfigError(f"data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {cs!r}")
    _validate_task(cfg)
    for k in ("lr", "weight_decay", "label_smoothing", "warmup_epochs", "flip", "color_jitter", "grayscale"):
        sec = "train" if k in t else "data"
        try:
            float(cfg[sec][k])
        except (TypeError, ValueError):
            raise ConfigError(f"{sec}.{k} must be a number, got {cfg[sec][k]!r}") from None


def _validate_decoding(d: Dict[str, Any]) -> None:
    if d["decoder"] not in DECODER_CHOICES:
        raise ConfigError(f"data.decoder={d['decoder']!r}; expected one of {DECODER_CHOICES}")
    if d["resize"] not in ("auto",) + INTERPOLATIONS:
        raise ConfigError(f"data.resize={d['resize']!r}; expected 'auto' or one of {INTERPOLATIONS}")
    for key in ("min_frames", "frame_start_index"):
        v = d[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if key == "min_frames" else 0):
            raise ConfigError(f"data.{key} must be a {'positive' if key == 'min_frames' else 'non-negative'} "
                              f"integer, got {v!r}")
    tpl = d["frame_template"]
    try:
        ok = isinstance(tpl, str) and tpl.format(1) != tpl
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"data.frame_template={tpl!r} must be a str.format template of the frame number, "
                          "e.g. 'img_{:05d}.jpg'")


def _validate_task(cfg: Dict[str, Any]) -> None:
    t = cfg["task"]
    if t["name"] not in TASK_NAMES:
        raise ConfigError(f"task.name={t['name']!r}; expected one of {TASK_NAMES}")
    if t["shots"] is not None and (not isinstance(t["shots"], int) or isinstance(t["shots"], bool)
                                   or t["shots"] < 1):
        raise ConfigError(f"task.shots must be a positive integer or null, got {t['shots']!r}")
    if not isinstance(t["splits"], (list, tuple)):
        raise ConfigError(f"task.splits must be a list of class-split files, got {t['splits']!r}")
    if not isinstance(t["template"], str) or "{}" not in t["template"]:
        raise ConfigError(f"task.template must contain '{{}}' for the class name, got {t['template']!r}")


def flip_label_map(value) -> Dict[int, int]:
    """``data.flip_label_map`` as a dict of ints (it may be a JSON file path)."""
    if value is None:
        return {}
    if isinstance(value, str):
        if not os.path.isfile(value):
            raise ConfigError(f"data.flip_label_map file {value!r} does not exist")
        with open(value) as f:
            value = json.load(f)
    if not isinstance(value, dict):
        raise ConfigError(f"data.flip_label_map must be a mapping label -> label, got {value!r}")
    return {int(k): int(v) for k, v in value.items()}


def dump(cfg: Dict[str, Any]) -> str:
    """The configuration as YAML text."""
    return yaml.safe_dump(cfg, sort_keys=False)
