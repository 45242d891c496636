"""Robustness (issue 18): run-directory lock, input checks, non-finite batches, evaluation
over exactly the readable set, verified checkpoints with fallback, file modes, write
errors, one-line errors, output without a terminal, light CLI start-up."""
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from vpeft.engine import checkpoint as ckpt
from vpeft.engine import load_config, rundir
from vpeft.engine.runlog import ProgressLog, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(synthetic_clips):
    return synthetic_clips


def _ov(data, out, *extra):
    return [f"data.root={data['root']}", f"data.train_list={data['train_list']}", f"data.val_list={data['val_list']}",
            f"data.class_names={data['class_names']}", "data.num_workers=0", "data.flip=0.0",
            "model.backbone=vpeft-tiny", "model.num_frames=4", "model.method=st_adapter",
            "model.options.bottleneck=16", "model.dropout=0.0", "train.batch_size=4", "train.epochs=2",
            "train.lr=3e-3", "train.warmup_epochs=0.5", "train.log_every=1", "train.eval_every=0",
            "tensorboard=false", f"output_dir={out}", *extra]


def _trainer(data, out, *extra, **kw):
    from vpeft.engine import Trainer

    return Trainer(load_config(None, _ov(data, out, *extra)), progress=False, **kw)


def _losses(summary):
    return [h["loss"] for h in summary["history"]]


# ---------------------------------------------------------------------------- run directories
_HOLDER = textwrap.dedent("""
    import sys, time
    from vpeft.engine import rundir
    lock = rundir.claim(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
""")


def test_second_run_into_a_locked_directory_is_refused_at_once(data, tmp_path, capsys):
    from vpeft.cli import main

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        rc = main(["train", "--config", "demo", "--no-progress", *_ov(data, out)])
        elapsed = time.monotonic() - t0
        err = capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert rc == 2 and elapsed < 10, (rc, elapsed)
    assert f"is in use by PID {holder.pid} on host {socket.gethostname()}" in err and "Traceback" not in err
    assert not (out / "metrics.jsonl").exists()          # the second run wrote nothing
    rundir.claim(str(out)).release()                     # the kernel dropped the dead holder's lock


def test_new_run_in_a_used_directory_needs_overwrite(tmp_path, caplog):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"event": "start"}\n')
    with pytest.raises(rundir.RunDirError, match="already holds a run .*--resume.*--overwrite"):
        rundir.claim(str(out))
    rundir.claim(str(out), resume=True).release()        # continuing it is fine
    with caplog.at_level(logging.INFO, "vpeft"):
        rundir.claim(str(out), overwrite=True).release()
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    assert "--overwrite: removed" in caplog.text
    with rundir.claim(str(out)):                          # the same process cannot take it twice either
        with pytest.raises(rundir.RunDirError, match=f"PID {os.getpid()}"):
            rundir.claim(str(out))


def test_default_output_dir_is_new_per_run(tmp_path):
    a = rundir.default_output_dir("demo", root=str(tmp_path))
    assert os.path.basename(a).startswith("demo-") and not os.path.exists(a)
    os.makedirs(a)
    b = rundir.default_output_dir("demo", root=str(tmp_path))
    assert b != a and b.startswith(a)
    assert rundir.latest_run("demo", root=str(tmp_path)) == a
    assert rundir.latest_run("other", root=str(tmp_path)) is None
    assert load_config("demo")["output_dir"].startswith(os.path.join("runs", "demo-"))


# ---------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def tiny_model():
    import vpeft
    from vpeft.backbones.build import create_backbone

    torch.manual_seed(0)
    return vpeft.adapt(create_backbone("vpeft-tiny"), "st_adapter", num_frames=2, num_classes=3,
                       bottleneck=8).eval()


def test_uint8_video_equals_normalised_float(tiny_model):
    vm = tiny_model
    pixels = torch.randint(0, 256, (2, 2, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor(vm.tower.mean).view(3, 1, 1)
    std = torch.tensor(vm.tower.std).view(3, 1, 1)
    with torch.no_grad():
        a = vm(pixels)
        b = vm((pixels.float() / 255 - mean) / std)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.int64, torch.complex64])
def test_other_video_dtypes_are_refused(tiny_model, dtype):
    with pytest.raises(ValueError, match=f"video dtype {dtype} is not supported"):
        tiny_model(torch.zeros(1, 2, 3, 32, 32, dtype=dtype))


def test_empty_batch_is_refused(tiny_model):
    with pytest.raises(ValueError, match="empty batch"):
        tiny_model(torch.zeros(0, 2, 3, 32, 32))


@pytest.mark.parametrize("kwargs,match", [
    ({"bottleneck": 16.7}, r"bottleneck=16\.7 \(float\); expected a positive int"),
    ({"bottleneck": "16"}, r"bottleneck='16' \(str\)"),
    ({"num_classes": True}, r"num_classes must be a positive int or None, got True \(bool\)"),
    ({"num_frames": 2.0}, r"num_frames must be a positive int, got 2\.0"),
    ({"dropout": 1.5}, r"dropout=1\.5"),
])
def test_wrong_option_types_are_refused(kwargs, match):
    import vpeft
    from vpeft.backbones.build import create_backbone

    args = {"num_frames": 2, "num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        vpeft.adapt(create_backbone("vpeft-tiny"), "st_adapter", **args)


def test_nan_batch_stops_before_the_step_naming_the_clips(data, tmp_path):
    from vpeft.engine.trainer import NonFiniteError

    tr = _trainer(data, tmp_path / "run")
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    load = tr.train_ds._load
    poisoned = set()

    def nan_clip(index, rng):
        video, label = load(index, rng)
        if not poisoned:                     # the first clip loaded gets one NaN pixel
            poisoned.add(tr.train_ds.samples[index].path)
            video = video.clone()
            video[0, 0, 0, 0] = float("nan")
        return video, label

    tr.train_ds._load = nan_clip
    with pytest.raises(NonFiniteError) as e:
        tr.fit()
    msg = str(e.value)
    assert "before optimizer step 1" in msg and poisoned.pop() in msg and "Hint" in msg
    for n, p in tr.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), n          # never updated with NaN
    assert not tr.run_lock                               # released on the way out


# ---------------------------------------------------------------------------- evaluation
def test_eval_excludes_an_unreadable_video_and_reports_it(data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data["root"], root)
    lines = open(data["val_list"]).read().splitlines()
    header, rows = lines[0], lines[1:]
    bad = rows[3].split(",")[0]
    open(root / bad, "wb").close()                        # a 0-byte video
    rest = tmp_path / "rest.csv"
    rest.write_text("\n".join([header] + rows[:3] + rows[4:]) + "\n")
    from vpeft.engine import Trainer

    def evaluate(*extra):
        torch.manual_seed(0)
        return Trainer(load_config(None, _ov(data, tmp_path / "e", f"data.root={root}", *extra)), progress=False,
                       train=False).evaluate()

    m = evaluate()
    ref = evaluate(f"data.val_list={rest}")
    assert m["videos_skipped"] == 1 and m["videos_skipped_names"] == [bad]
    assert m["videos_evaluated"] == m["videos"] == 7 == ref["videos"]
    for k in ("top1", "top5", "mean_class", "loss"):     # over exactly the readable videos
        assert m[k] == pytest.approx(ref[k])
    from vpeft.data import VideoDecodeError

    with pytest.raises(VideoDecodeError, match=bad):
        evaluate("data.strict=true")


# ---------------------------------------------------------------------------- checkpoints
def _two_checkpoints(d):
    for step in (1, 2):
        ckpt.save_checkpoint(d, step, {"w": torch.full((64,), float(step))}, {"step": step, "t": torch.ones(2)},
                             f"step: {step}\n")


def _flip(path, n=200):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        for i in range(n):
            data[(i * 7919) % len(data)] ^= 0xFF
        f.seek(0)
        f.write(data)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


CORRUPTIONS = {"bitflip": (ckpt.WEIGHTS, _flip, "SHA-256"), "truncate": (ckpt.STATE, _truncate, "truncated"),
               "missing": (ckpt.WEIGHTS, os.unlink, "missing"), "no_manifest": (ckpt.MANIFEST, os.unlink, "missing")}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog, kind):
    d = str(tmp_path / "checkpoints")
    _two_checkpoints(d)
    fn, damage, why = CORRUPTIONS[kind]
    damage(os.path.join(d, "step_00000002", fn))
    with caplog.at_level(logging.WARNING, "vpeft"):
        found = ckpt.find_checkpoint(str(tmp_path))
    assert os.path.basename(found) == "step_00000001"
    assert why in caplog.text and "step_00000002" in caplog.text and "previous kept checkpoint" in caplog.text
    assert ckpt.load_state(str(tmp_path))["step"] == 1
    with pytest.raises(ckpt.CheckpointError, match=why):   # named directly, it is an error
        ckpt.find_checkpoint(os.path.join(d, "step_00000002"))
    damage(os.path.join(d, "step_00000001", fn))
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):
        ckpt.find_checkpoint(d)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    return _trainer(data, tmp_path_factory.mktemp("full"), "train.epochs=1").fit()


@pytest.mark.parametrize("kind", ["bitflip", "truncate", "missing"])
def test_resume_after_corruption_continues_on_the_uninterrupted_curve(data, tmp_path, uninterrupted, caplog, kind):
    out = tmp_path / "run"
    first = _trainer(data, out, "train.epochs=1", "train.checkpoint_every=2", "train.stop_at_step=4").fit()
    assert first["steps"] == 4
    names = sorted(os.listdir(out / "checkpoints"))
    assert names == ["latest", "step_00000002", "step_00000004"], names     # one per step, no step_4.1
    fn, damage, why = CORRUPTIONS[kind]
    damage(str(out / "checkpoints" / "step_00000004" / fn))
    os.mkdir(out / "checkpoints" / ".tmp-step_00000006-999")               # an interrupted write's leftover
    with caplog.at_level(logging.WARNING, "vpeft"):
        rest = _trainer(data, out, "train.epochs=1", resume=str(out)).fit()
    assert "step_00000004 is unusable" in caplog.text and why in caplog.text
    assert not (out / "checkpoints" / ".tmp-step_00000006-999").exists()
    assert rest["steps"] == 6
    assert _losses(rest) == pytest.approx(_losses(uninterrupted), rel=1e-5, abs=1e-6)


def test_resume_without_a_checkpoint_starts_fresh_or_requires_one(data, tmp_path, capsys, caplog):
    from vpeft.cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n')   # a run killed before its first checkpoint
    assert main(["train", "--config", "demo", "--resume=require", "--no-progress", *_ov(data, out)]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, "vpeft"):
        assert main(["train", "--no-progress", "--config", "demo", "--resume", *_ov(data, out, "train.max_steps=2")]) == 0
    assert "no checkpoint in" in caplog.text and "starting a fresh run" in caplog.text
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2
    starts = [r for r in read_jsonl(str(out / "metrics.jsonl")) if r.get("event") in ("start", "resume")]
    assert [r["event"] for r in starts] == ["start"]


def test_checkpoint_modes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        d = str(tmp_path / "checkpoints")
        _two_checkpoints(d)
        ckpt.atomic_write_text(str(tmp_path / "config.yaml"), "a: 1\n")
    finally:
        os.umask(old)
    step = os.path.join(d, "step_00000002")
    assert oct(os.stat(step).st_mode & 0o777) == oct(0o755)
    assert oct(os.stat(d).st_mode & 0o777) == oct(0o755)
    for fn in (ckpt.WEIGHTS, ckpt.STATE, ckpt.CONFIG, ckpt.MANIFEST):
        assert oct(os.stat(os.path.join(step, fn)).st_mode & 0o777) == oct(0o644), fn
    for f in (os.path.join(d, "latest"), str(tmp_path / "config.yaml")):
        assert oct(os.stat(f).st_mode & 0o777) == oct(0o644), f


@pytest.mark.parametrize("err,match", [(errno.ENOSPC, "no space left on device / writing .*step_00000003/state.pt"),
                                       (errno.EROFS, "step_00000003/state.pt is read-only")])
def test_write_errors_are_plain_and_keep_the_previous_checkpoint(tmp_path, monkeypatch, err, match):
    d = str(tmp_path / "checkpoints")
    _two_checkpoints(d)
    real = ckpt._write_bytes

    def failing(path, data):
        if path.endswith(ckpt.STATE):
            with open(path, "wb") as f:       # part of it made it to disk, then the device refused
                f.write(data[:10])
            raise OSError(err, os.strerror(err))
        real(path, data)

    monkeypatch.setattr(ckpt, "_write_bytes", failing)
    monkeypatch.setattr(ckpt, "_mount_point", lambda p: "/")
    with pytest.raises(ckpt.CheckpointWriteError, match=match):
        ckpt.save_checkpoint(d, 3, {"w": torch.zeros(64)}, {"step": 3}, "step: 3\n")
    assert sorted(os.listdir(d)) == ["latest", "step_00000001", "step_00000002"]   # no temporary left
    assert ckpt.load_state(d)["step"] == 2


def test_state_is_loaded_with_weights_only(tmp_path):
    d = str(tmp_path / "checkpoints")
    _two_checkpoints(d)
    step = os.path.join(d, "step_00000002")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"step": 2, "x": Payload()}, os.path.join(step, ckpt.STATE))
    with open(os.path.join(step, ckpt.MANIFEST)) as f:          # a consistent manifest: only the unpickler can refuse
        man = json.load(f)
    blob = open(os.path.join(step, ckpt.STATE), "rb").read()
    man["files"][ckpt.STATE] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    with open(os.path.join(step, ckpt.MANIFEST), "w") as f:
        json.dump(man, f)
    with pytest.raises(ckpt.CheckpointError, match="weights_only=True"):
        ckpt.load_state(step)
    assert not marker.exists()


def test_rng_state_round_trips_through_weights_only(tmp_path):
    import random

    import numpy as np

    st = ckpt.rng_state()
    torch.save(st, tmp_path / "s.pt")
    a = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True))
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


# ---------------------------------------------------------------------------- one-line errors
def test_malformed_yaml_and_bad_backbone_checkpoint_are_one_line(data, tmp_path, capsys):
    from vpeft.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  method: st_adapter\n  options: {bottleneck: 16\ntrain:\n  lr: 1\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vpeft train: error: {bad}:4:6: malformed YAML") and "\n" not in err

    garbage = tmp_path / "w.pt"
    garbage.write_bytes(b"\x80\x04garbage" * 10)
    assert main(["eval", "--config", "demo", "--checkpoint", str(garbage), "--adapters", str(tmp_path),
                 *_ov(data, tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"backbone weights file {garbage}" in err and "not a readable checkpoint" in err and "\n" not in err

    from vpeft.backbones.build import create_backbone

    sd = create_backbone("vpeft-tiny").state_dict()
    sd.pop("visual.proj")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "mismatch.pt")
    assert main(["eval", "--config", "demo", "--checkpoint", str(tmp_path / "mismatch.pt"), "--adapters",
                 str(tmp_path), *_ov(data, tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert "1 missing keys (e.g. visual.proj)" in err and "1 unexpected keys (e.g. extra.weight)" in err


# ---------------------------------------------------------------------------- output and start-up
def test_progress_lines_without_a_terminal():
    now = [0.0]
    p = ProgressLog(100, every_steps=10, every_s=30, clock=lambda: now[0])
    got = []
    for step in range(1, 101):
        now[0] += 0.5 if step < 50 else 40.0          # slow steps: a line at least every 30 s
        line = p.step(step, 1.0, 1e-3, 8.0)
        if line:
            got.append(step)
    assert got[:4] == [10, 20, 30, 40] and all(s in got for s in range(50, 101))
    line = ProgressLog(10, every_steps=5).step(5, 0.25, 2e-4, 12.5)
    assert line.startswith("step 5/10  loss 0.2500  lr 2.00e-04  12.5 clips/s  ETA ")
    assert ProgressLog(10, enabled=False).step(10, 0.0, 0.0, 0.0) is None


def test_progress_bar_total_of_a_partial_last_epoch(data, tmp_path, monkeypatch, caplog):
    import vpeft.engine.trainer as trainer_mod

    totals = []
    real = trainer_mod.tqdm

    def spy(*a, **k):
        if k.get("unit") == "step":
            totals.append(k["total"])
        return real(*a, **k)

    monkeypatch.setattr(trainer_mod, "tqdm", spy)
    with caplog.at_level(logging.INFO, "vpeft"):
        _trainer(data, tmp_path / "run", "train.max_steps=8", "train.log_every=4").fit()   # 6 steps per epoch: 6 + 2
    assert totals == [6, 2]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [ln.split()[1] for ln in lines] == ["4/8", "8/8"] and all("clips/s  ETA" in ln for ln in lines)


def test_cli_help_imports_no_torch_and_overrides_go_anywhere():
    code = ("import sys, contextlib, io\n"
            "from vpeft.cli import main, split_overrides\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['--help'])\n"
            "    except SystemExit: pass\n"
            "    try: main(['train', '--help'])\n"
            "    except SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'vpeft.model', 'open_clip') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    from vpeft.cli import build_parser, split_overrides

    argv = ["train", "train.lr=1e-4", "--config", "demo", "--resume", "model.options.bottleneck=8", "--overwrite",
            "data.root=/x=y"]
    rest, ov = split_overrides(argv)
    assert ov == ["train.lr=1e-4", "model.options.bottleneck=8", "data.root=/x=y"]
    args = build_parser(full=False).parse_args(rest)
    assert args.resume == "" and args.overwrite and args.config == "demo"


@pytest.mark.parametrize("override,match", [("train.checkpoint_every=2.5", r"train.checkpoint_every must be an integer"),
                                            ("train.log_every='10'", r"train.log_every must be an integer"),
                                            ("data.num_classes=true", r"data.num_classes must be an integer")])
def test_config_fractions_and_strings_for_counts_are_refused(override, match):
    from vpeft.engine import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config("demo", [override])


def test_a_run_that_cannot_start_releases_the_lock(data, tmp_path):
    from vpeft.engine import ConfigError

    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        _trainer(data, out, "data.num_classes=3")       # the list has 4 classes
    assert e.value is not None                          # the traceback (and the Trainer) is still alive here
    rundir.claim(str(out)).release()


def test_early_check_creates_nothing_for_a_new_directory(tmp_path):
    out = tmp_path / "new"
    assert not rundir.claim(str(out), check_only=True).held
    assert not out.exists()
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(rundir.RunDirError, match="already holds a run"):
        rundir.claim(str(out), check_only=True)
    assert (out / "metrics.jsonl").exists()
    rundir.claim(str(out), check_only=True, overwrite=True)
    assert (out / "metrics.jsonl").exists()             # the check removes nothing


def test_nan_loss_from_a_finite_batch_stops_with_a_hint(data, tmp_path, monkeypatch):
    from vpeft.engine.trainer import NonFiniteError

    tr = _trainer(data, tmp_path / "run")
    monkeypatch.setattr(tr.task, "criterion", lambda logits, label: (logits * float("inf")).sum())   # the task owns the loss
    with pytest.raises(NonFiniteError, match=r"before optimizer step 1: the loss is (nan|inf) although the batch "
                                             r"is finite \(clips videos/train/.*Hint: lower train.lr"):
        tr.fit()
