"""Training engine: exact resume, atomic checkpoints, torchrun parity, early errors, CLI (CPU, small)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from vpeft.data import ListFileError
from vpeft.engine import ConfigError, Trainer, load_config
from vpeft.engine import checkpoint as ckpt
from vpeft.engine.runlog import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(synthetic_clips):
    return synthetic_clips


def _overrides(data, out, *extra):
    return [f"data.root={data['root']}", f"data.train_list={data['train_list']}", f"data.val_list={data['val_list']}",
            f"data.class_names={data['class_names']}", "data.num_workers=0", "data.flip=0.5",
            f"data.flip_label_map={data['flip_label_map']}",
            "model.backbone=vpeft-tiny", "model.num_frames=4", "model.method=st_adapter",
            "model.options.bottleneck=16", "train.batch_size=4", "train.epochs=2", "train.lr=3e-3",
            "train.warmup_epochs=0.5", "train.log_every=1", "train.eval_every=0", "tensorboard=false",
            f"output_dir={out}", *extra]


def _losses(hist):
    return [h["loss"] for h in hist]


def test_resume_mid_epoch_reproduces_uninterrupted_losses(data, tmp_path):
    full = Trainer(load_config(None, _overrides(data, tmp_path / "a")), progress=False).fit()
    assert full["steps"] == 12 and len(full["history"]) == 12
    first = Trainer(load_config(None, _overrides(data, tmp_path / "b", "train.stop_at_step=5")), progress=False).fit()
    assert first["steps"] == 5
    saved = ckpt.load_state(str(tmp_path / "b"))
    assert (saved["step"], saved["epoch"], saved["step_in_epoch"]) == (5, 0, 5)   # mid-epoch
    # resumed with loader workers this time: clip content must not depend on them
    cfg = load_config(None, _overrides(data, tmp_path / "b", "data.num_workers=1"))
    rest = Trainer(cfg, progress=False, resume=str(tmp_path / "b")).fit()
    assert rest["steps"] == 12
    assert _losses(rest["history"]) == pytest.approx(_losses(full["history"]), rel=1e-5, abs=1e-6)
    assert rest["eval"]["top1"] == pytest.approx(full["eval"]["top1"])
    # the checkpoint holds only the trained weights, no frozen backbone tensor
    weights, config_text = ckpt.load_weights(str(tmp_path / "b"))
    assert weights and all(".adapter_" in k or k.startswith("head.") for k in weights), sorted(weights)[:5]
    assert yaml.safe_load(config_text)["model"]["method"] == "st_adapter"


def test_evaluation_metrics_and_multiview(data, tmp_path):
    cfg = load_config(None, _overrides(data, tmp_path, "data.test_clips=2", "data.test_crops=3"))
    tr = Trainer(cfg, progress=False, train=False)
    m = tr.evaluate()
    assert m["videos"] == 8 and m["views"] == 6
    assert 0 <= m["top1"] <= m["top5"] <= 100 and 0 <= m["mean_class"] <= 100


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    from vpeft.engine import checkpoint as ckpt
    d = sys.argv[1]; where = sys.argv[2]
    ckpt.save_checkpoint(d, 1, {"w": torch.ones(3)}, {"step": 1}, "step: 1\\n")
    real_write = ckpt._write_bytes
    def write(path, data):   # leave a half-written file behind, then die
        if path.endswith({"weights": ckpt.WEIGHTS, "state": ckpt.STATE, "manifest": ckpt.MANIFEST}.get(where, "?")):
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(path, data)
    ckpt._write_bytes = write
    if where == "pointer":
        ckpt.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)   # killed while moving the pointer
    ckpt.save_checkpoint(d, 2, {"w": torch.full((3,), 2.0)}, {"step": 2}, "step: 2\\n")
""")


@pytest.mark.parametrize("where", ["weights", "state", "manifest", "pointer"])
def test_checkpoint_killed_mid_write_leaves_previous_loadable(tmp_path, where):
    d = str(tmp_path / "checkpoints")
    r = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, d, where], env={**os.environ, "PYTHONPATH": ROOT},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    assert os.path.basename(ckpt.find_checkpoint(d)) == "step_00000001"
    w, cfg = ckpt.load_weights(d)
    assert torch.equal(w["w"], torch.ones(3)) and cfg == "step: 1\n"
    assert ckpt.load_state(d)["step"] == 1


def test_torchrun_two_processes_match_single_process(data, tmp_path):
    cfg = {k: v for k, v in (o.split("=", 1) for o in _overrides(data, tmp_path / "x", "model.dropout=0.0",
                                                                  "train.epochs=1"))}
    nested = {}
    for k, v in cfg.items():
        node = nested
        *head, last = k.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = yaml.safe_load(v)
    path = tmp_path / "cfg.yaml"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    results = {}
    for n in (1, 2):
        nested["output_dir"] = str(tmp_path / f"world{n}")
        path.write_text(yaml.safe_dump(nested))
        if n == 1:   # the single-process reference runs in this process (saves a second launch)
            Trainer(load_config(str(path)), progress=False).fit()
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   "-m", "vpeft.cli", "train", "--config", str(path), "--no-progress"]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-3000:]
        recs = read_jsonl(str(tmp_path / f"world{n}" / "metrics.jsonl"))
        results[n] = ([x["loss"] for x in recs if x.get("split") == "train"],
                      [x for x in recs if x.get("split") == "val"][-1])
        assert any(x.get("world") == n for x in recs)
    assert len(results[1][0]) == len(results[2][0]) == 6     # one record per step: only rank 0 logs
    assert os.listdir(tmp_path / "world2" / "checkpoints") == ["latest", "step_00000006"] or \
        sorted(os.listdir(tmp_path / "world2" / "checkpoints")) == ["latest", "step_00000006"]
    assert results[2][0] == pytest.approx(results[1][0], rel=1e-4, abs=1e-5)
    assert results[2][1]["videos"] == results[1][1]["videos"] == 8
    assert results[2][1]["top1"] == pytest.approx(results[1][1]["top1"])


# ---------------------------------------------------------------- errors before training
def test_unknown_config_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'.*'lr'"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'"):
        load_config(None, ["modle.method=msta"])


def test_num_frames_mismatch(data, tmp_path):
    with pytest.raises(ConfigError, match=r"data.num_frames=8 does not match model.num_frames=4"):
        load_config(None, _overrides(data, tmp_path, "data.num_frames=8"))
    Trainer(load_config(None, _overrides(data, tmp_path / "r", "train.max_steps=1")), progress=False).fit()
    cfg = load_config(None, _overrides(data, tmp_path / "r2", "model.num_frames=8"))
    with pytest.raises(ConfigError, match=r"trained with model.num_frames=4, this run has model.num_frames=8"):
        Trainer(cfg, progress=False, resume=str(tmp_path / "r"))


def test_missing_video_directory_and_empty_list(data, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"video directory '/no/videos' \(data.root\) does not exist"):
        Trainer(load_config(None, _overrides(data, tmp_path, "data.root=/no/videos")), progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ListFileError, match="has no samples"):
        Trainer(load_config(None, _overrides(data, tmp_path, f"data.train_list={empty}")), progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()      # nothing started


def test_cli_errors_are_one_line(data, tmp_path, capsys):
    from vpeft.cli import main

    assert main(["train", "--config", "demo", *_overrides(data, tmp_path, "train.lrr=1")]) == 2
    err = capsys.readouterr().err
    assert "vpeft train: error: unknown config key 'train.lrr'" in err and "Traceback" not in err
    assert main(["train", "--config", "no_such_preset"]) == 2
    assert "presets:" in capsys.readouterr().err


def test_pretrained_tag_offline_points_to_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}  # no network, no cached weights
    code = ("from vpeft.backbones.build import create_backbone\n"
            "create_backbone('ViT-B-32', pretrained='openai')\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode != 0
    assert "PretrainedUnavailable" in r.stderr and "--checkpoint PATH" in r.stderr


def test_local_backbone_checkpoint(tmp_path):
    from vpeft.backbones.build import create_backbone

    src = create_backbone("vpeft-tiny")
    torch.save(src.state_dict(), tmp_path / "w.pt")
    torch.manual_seed(123)
    dst = create_backbone("vpeft-tiny", checkpoint=str(tmp_path / "w.pt"))
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        create_backbone("vpeft-tiny", checkpoint=str(tmp_path / "none.pt"))


def test_cli_make_synthetic_train_eval(tmp_path, capsys):
    from vpeft.cli import main

    assert main(["make-synthetic", str(tmp_path / "d"), "--train", "8", "--val", "4", "--size", "32",
                 "--frames", "8"]) == 0
    paths = json.loads(capsys.readouterr().out)
    ov = _overrides(paths, tmp_path / "run", "train.epochs=1", "model.method=side4video",
                    "model.options={side_width: 64, side_layers: 2}")   # a whole mapping replaces the options
    assert main(["train", "--config", "demo", "--no-progress", *ov, "tensorboard=true"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "run" / "tensorboard"))
    assert out["steps"] == 2 and out["skipped_videos"] == 0 and out["eval"]["videos"] == 4
    assert main(["eval", "--config", "demo", "--no-progress", "--adapters", str(tmp_path / "run"), *ov]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["top1"] == pytest.approx(out["eval"]["top1"])


@pytest.mark.parametrize("name", ["st_adapter_k400_b16", "st_adapter_ssv2_b16", "side4video_ssv2_b16",
                                  "side4video_ssv2_l14", "side4video_ssv2_e14", "msta_k400_b16", "demo"])
def test_presets_load(name):
    cfg = load_config(name)
    assert cfg["model"]["method"] in ("st_adapter", "side4video", "msta", "linear_probe")


def test_gradient_accumulation_matches_full_batch(data, tmp_path):
    ov = ("model.dropout=0.0", "train.epochs=1")
    full = Trainer(load_config(None, _overrides(data, tmp_path / "a", *ov)), progress=False).fit()
    acc = Trainer(load_config(None, _overrides(data, tmp_path / "b", *ov, "train.grad_accum=2")), progress=False).fit()
    assert _losses(acc["history"]) == pytest.approx(_losses(full["history"]), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("method,options", [("st_adapter", {"bottleneck": 16}), ("side4video", {"side_width": 64})])
def test_activation_checkpointing_gives_the_same_gradients(data, tmp_path, method, options):
    from vpeft.engine.build import build_video_model as build_model

    grads = []
    for ckpt_on in (False, True):
        cfg = load_config(None, _overrides(data, tmp_path, f"model.method={method}", f"model.options={options}",
                                           "model.dropout=0.0", f"train.activation_checkpointing={ckpt_on}"))
        torch.manual_seed(0)
        vm = build_model(cfg, 4, torch.device("cpu")).train()
        torch.manual_seed(1)
        vm(torch.randn(2, 4, 3, 32, 32)).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in vm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def test_corrupt_training_video_is_counted_and_reported(data, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data["root"], root)
    with open(root / "videos/train/00005.mp4", "wb") as f:
        f.write(b"not a video")
    cfg = load_config(None, _overrides(data, tmp_path / "run", f"data.root={root}", "train.epochs=1"))
    summary = Trainer(cfg, progress=False).fit()
    assert summary["steps"] == 6 and summary["skipped_videos"] >= 1      # the epoch completed
    ends = [r for r in read_jsonl(str(tmp_path / "run" / "metrics.jsonl")) if r.get("event") == "epoch_end"]
    assert ends[-1]["skipped_videos"] == summary["skipped_videos"]
