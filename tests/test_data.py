"""Data pipeline: list files, frame sampling, augmentation, decoding, skip-and-count (CPU, small)."""
import os

import numpy as np
import pytest
import torch

from vpeft.data import (EpochSampler, ListFileError, TestTransform, TrainTransform, VideoDataset, collate,
                        dense_indices, read_class_names, read_list, segment_indices)
from vpeft.data.synthetic import FLIP_LABEL_MAP, REVERSE_LABEL_MAP, render_video, write_mp4, write_synthetic

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ---------------------------------------------------------------- list files
def test_plain_list_with_spaces_comments_and_names(tmp_path):
    names = _write(tmp_path, "classes.txt", "walk\nrun\n\n")
    lst = _write(tmp_path, "train.txt", "# comment\na/b c.mp4 1\n\nx.mp4 walk\n")
    s = read_list(lst, class_names=read_class_names(names))
    assert [(x.path, x.label) for x in s] == [("a/b c.mp4", 1), ("x.mp4", 0)]


def test_csv_list_with_header(tmp_path):
    lst = _write(tmp_path, "val.csv", "video,extra,label\nv1.mp4,foo,2\nv2.mp4,bar,0\n")
    assert [(x.path, x.label) for x in read_list(lst, num_classes=3)] == [("v1.mp4", 2), ("v2.mp4", 0)]


@pytest.mark.parametrize("name,text,line,what", [
    ("bad.txt", "a.mp4 1\nb.mp4\n", 2, "expected 'relative/path.mp4 LABEL'"),
    ("bad.txt", "a.mp4 1\n\nb.mp4 cat\n", 3, "label 'cat' is not an integer"),
    ("bad.txt", "a.mp4 7\n", 1, "outside \\[0, 4\\)"),
    ("bad.csv", "path,label\na.mp4,1\nb.mp4\n", 3, "expected 2 fields"),
    ("bad.csv", "path,label\na.mp4,1\nb.mp4,-1\n", 3, "negative|outside"),
])
def test_bad_line_names_file_and_line(tmp_path, name, text, line, what):
    lst = _write(tmp_path, name, text)
    with pytest.raises(ListFileError, match=rf"{lst}:{line}: .*({what})"):
        read_list(lst, num_classes=4)


def test_csv_without_known_columns(tmp_path):
    lst = _write(tmp_path, "x.csv", "file,y\na.mp4,1\n")
    with pytest.raises(ListFileError, match=r"x.csv:1: CSV header"):
        read_list(lst)


def test_empty_and_missing_list(tmp_path):
    with pytest.raises(ListFileError, match="has no samples"):
        read_list(_write(tmp_path, "empty.txt", "\n# nothing\n"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_list(str(tmp_path / "nope.txt"))


# ---------------------------------------------------------------- sampling
def test_segment_sampling_test_is_centres_and_train_in_segments():
    assert segment_indices(16, 8, train=False) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert segment_indices(16, 4, train=False, clip=0, num_clips=2) == [1, 5, 9, 13]
    assert segment_indices(16, 4, train=False, clip=1, num_clips=2) == [3, 7, 11, 15]
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = segment_indices(30, 8, train=True, rng=rng)
        seg = 30 / 8
        assert all(int(i * seg) <= f < (i + 1) * seg for i, f in enumerate(idx)), idx


@pytest.mark.parametrize("total", [1, 3, 5])
def test_segment_sampling_short_video_repeats_frames(total):
    rng = np.random.default_rng(1)
    for idx in (segment_indices(total, 8, train=False), segment_indices(total, 8, train=True, rng=rng)):
        assert len(idx) == 8 and all(0 <= i < total for i in idx)
        assert idx == sorted(idx) and set(idx) == set(range(total))   # covers the video, in order


def test_dense_sampling():
    assert dense_indices(100, 4, 8, train=False) == [38, 46, 54, 62]            # centred
    assert dense_indices(100, 4, 8, train=False, clip=0, num_clips=3) == [0, 8, 16, 24]
    assert dense_indices(100, 4, 8, train=False, clip=2, num_clips=3) == [75, 83, 91, 99]
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = dense_indices(40, 4, 5, train=True, rng=rng)
        assert np.all(np.diff(idx) == 5) and 0 <= idx[0] and idx[-1] < 40
    assert dense_indices(6, 4, 3, train=False) == [0, 3, 5, 5]                  # short: clamp to the last frame
    assert dense_indices(6, 4, 3, train=True, rng=rng) == [0, 3, 5, 5]
    with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
        dense_indices(10, 4, 0, train=False)


# ---------------------------------------------------------------- transforms
def test_flip_swaps_label_with_map_and_keeps_clip_consistent():
    frames = np.zeros((4, 20, 20, 3), np.uint8)
    frames[:, :, :5] = 255                      # bright left edge
    tf = TrainTransform(16, MEAN, STD, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=1.0, flip_label_map={0: 1, 1: 0})
    x, label = tf(frames, 0, np.random.default_rng(0))
    assert x.shape == (4, 3, 16, 16) and label == 1
    assert x[..., -1].mean() > x[..., 0].mean()     # the bright edge moved right
    assert torch.equal(x[0], x[3])                  # same crop/flip for every frame
    _, label = tf(frames, 3, np.random.default_rng(0))
    assert label == 3                                # unmapped labels unchanged


def test_test_views_and_normalisation():
    frames = np.full((2, 24, 32, 3), 128, np.uint8)
    views = TestTransform(16, MEAN, STD, resize=16, num_crops=3)(frames)
    assert len(views) == 3 and all(v.shape == (2, 3, 16, 16) for v in views)
    assert torch.allclose(views[0], torch.full_like(views[0], (128 / 255 - 0.5) / 0.25), atol=1e-3)


# ---------------------------------------------------------------- dataset on real mp4 files
@pytest.fixture(scope="module")
def tiny_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    write_synthetic(str(root), num_train=8, num_val=4, size=32, frames=8, progress=False)
    return str(root)


def test_synthetic_files_and_decoding(tiny_videos):
    s = read_list(os.path.join(tiny_videos, "train.txt"))
    assert [x.label for x in s] == [0, 1, 2, 3] * 2
    assert [x.label for x in read_list(os.path.join(tiny_videos, "val.csv"))] == [0, 1, 2, 3]
    tf = TrainTransform(32, MEAN, STD, flip=0.0)
    ds = VideoDataset(tiny_videos, s, 4, tf, seed=3)
    a, b = ds[(2, 5)], ds[(2, 5)]
    assert a["video"].shape == (4, 3, 32, 32) and a["label"] == 2 and not a["failed"]
    assert torch.equal(a["video"], b["video"])                  # deterministic per (seed, epoch, index)
    assert not torch.equal(a["video"], ds[(2, 6)]["video"])     # and different next epoch
    test = VideoDataset(tiny_videos, s, 4, TestTransform(32, MEAN, STD, num_crops=3), num_clips=2)
    assert test[0]["video"].shape == (6, 4, 3, 32, 32)


def test_synthetic_class_symmetries():
    # the generator is built so that reversed / mirrored clips are other classes
    assert all(REVERSE_LABEL_MAP[REVERSE_LABEL_MAP[c]] == c != REVERSE_LABEL_MAP[c] for c in range(4))
    assert all(FLIP_LABEL_MAP[FLIP_LABEL_MAP[c]] == c != FLIP_LABEL_MAP[c] for c in range(4))
    v = render_video(0, np.random.default_rng(0), size=32, frames=6)
    assert v.shape == (6, 32, 32, 3) and v.dtype == np.uint8 and v.std() > 10


def test_corrupt_and_missing_videos_are_skipped_and_counted(tiny_videos, tmp_path, caplog):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_videos, root)
    with open(root / "videos/train/00001.mp4", "wb") as f:        # corrupt: not a video at all
        f.write(b"\x00\x00\x00\x18ftypmp42" + os.urandom(300))
    with open(root / "videos/train/00002.mp4", "r+b") as f:       # corrupt: truncated mp4
        f.truncate(64)
    os.remove(root / "videos/train/00003.mp4")                     # missing
    s = read_list(str(root / "train.txt"))
    ds = VideoDataset(str(root), s, 4, TrainTransform(32, MEAN, STD), seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=EpochSampler(len(ds), shuffle=True),
                                         collate_fn=collate, num_workers=1)
    batches = list(loader)
    assert sum(b["video"].shape[0] for b in batches) == 8           # the epoch is complete
    failed = [p for b in batches for p in b["failed"]]
    assert sorted(set(failed)) == ["videos/train/00001.mp4", "videos/train/00002.mp4", "videos/train/00003.mp4"]
    bad = {1, 2, 3}
    assert all(int(i) not in bad for b in batches for i in b["index"])  # replaced by readable videos


def test_missing_video_directory(tiny_videos):
    s = read_list(os.path.join(tiny_videos, "train.txt"))
    with pytest.raises(FileNotFoundError, match="video directory '/no/such/dir' .*does not exist"):
        VideoDataset("/no/such/dir", s, 4, TrainTransform(32, MEAN, STD))


def test_epoch_sampler_splits_global_batches_across_ranks():
    one = list(EpochSampler(20, shuffle=True, seed=1, drop_last=True, per_rank_multiple=4))
    r0 = list(EpochSampler(20, shuffle=True, seed=1, rank=0, world=2, drop_last=True, per_rank_multiple=2))
    r1 = list(EpochSampler(20, shuffle=True, seed=1, rank=1, world=2, drop_last=True, per_rank_multiple=2))
    for k in range(len(one) // 4):
        assert set(one[4 * k:4 * k + 4]) == set(r0[2 * k:2 * k + 2] + r1[2 * k:2 * k + 2])
    s = EpochSampler(20, shuffle=True, seed=1)
    s.set_epoch(0, start=5)
    assert list(s) == list(EpochSampler(20, shuffle=True, seed=1))[5:]
