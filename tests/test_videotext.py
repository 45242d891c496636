"""Video-text recognition: prompts and logits, zero-shot / few-shot / base-to-novel bookkeeping,
MSTA's consistency loss."""
import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import vpeft
from vpeft.backbones.viclip import create_viclip
from vpeft.tasks import (ConsistencyLoss, VideoTextClassifier, base_novel_split, base_to_novel_eval, encode_videos,
                         few_shot_indices, harmonic_mean, load_descriptions, read_class_split, subset_accuracy,
                         zero_shot)
from vpeft.tasks.consistency import frozen_text_tower
from vpeft.tasks.videotext import video_text_loss
from toy_data import ToyVideos, fit, make_toy_videos, tensor_batches

T = 4
NAMES = ToyVideos.class_names()          # 16 classes


def tiny_viclip():
    return create_viclip(None, image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
                         num_frames=T, text_width=32, text_layers=2, text_heads=2, embed_dim=32).eval()


def classifier(scale=0.1):
    vm = vpeft.adapt(tiny_viclip(), "msta", num_frames=T, bottleneck=16, layers=(1, 2), scale=scale)
    return VideoTextClassifier(vm, NAMES)


# ---------------------------------------------------------------- prompts and logits
def test_logits_are_scaled_cosine_of_prompt_embeddings():
    clf = classifier().eval()
    v = torch.randn(3, T, 3, 32, 32)
    with torch.no_grad():
        logits = clf(v, classes=[2, 5])
        model = clf.video_model.backbone
        tok = model.tokenize(["a video of " + NAMES[2], "a video of " + NAMES[5]])
        ref = 100.0 * F.normalize(model.encode_video(v), dim=-1) @ F.normalize(model.encode_text(tok), dim=-1).t()
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-4)


def test_open_clip_msta_classifier_uses_its_logit_scale():
    import open_clip
    clip = open_clip.CLIP(embed_dim=32, vision_cfg=dict(layers=2, width=64, patch_size=8, image_size=32),
                          text_cfg=dict(context_length=32, vocab_size=49408, width=32, heads=2, layers=2)).eval()
    with torch.no_grad():
        clip.logit_scale.fill_(2.0)
    clf = VideoTextClassifier(vpeft.adapt(clip, "msta", num_frames=T, bottleneck=16, layers=(1, 2)), NAMES).eval()
    v = torch.randn(2, T, 3, 32, 32)
    with torch.no_grad():
        logits = clf(v)
        video = F.normalize(clf.video_model.encode_video(v), dim=-1)
        text = F.normalize(clip.encode_text(open_clip.tokenize(clf.prompts(), context_length=32)), dim=-1)
    assert logits.shape == (2, 16)
    torch.testing.assert_close(logits, math.exp(2.0) * video @ text.t(), rtol=1e-5, atol=1e-4)


def test_classifier_refuses_models_it_cannot_use():
    with pytest.raises(ValueError, match="num_classes=None"):
        VideoTextClassifier(vpeft.adapt(tiny_viclip(), "msta", num_frames=T, num_classes=3, bottleneck=16), NAMES)
    import open_clip
    clip = open_clip.CLIP(embed_dim=16, vision_cfg=dict(layers=2, width=64, patch_size=8, image_size=32),
                          text_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=2))
    with pytest.raises(ValueError, match="smaller than the CLIP BPE vocabulary"):
        VideoTextClassifier(vpeft.adapt(clip, "linear_probe", num_frames=T), NAMES)


# ---------------------------------------------------------------- protocols
def test_few_shot_sampling_is_reproducible_by_seed():
    labels = [i % 5 for i in range(100)]          # 20 samples per class
    for k in (2, 4, 8, 16):
        a = few_shot_indices(labels, k, seed=3)
        assert a == few_shot_indices(labels, k, seed=3)
        assert len(a) == 5 * k and len(set(a)) == len(a)
        assert all(sum(labels[i] == c for i in a) == k for c in range(5))
    assert few_shot_indices(labels, 4, seed=3) != few_shot_indices(labels, 4, seed=4)
    # a class's draw does not depend on which other classes are drawn
    only_2 = few_shot_indices(labels, 4, seed=3, classes=[2])
    assert only_2 == [i for i in few_shot_indices(labels, 4, seed=3) if labels[i] == 2]
    with pytest.raises(ValueError, match="class 7 has 0 training samples"):
        few_shot_indices(labels, 2, seed=0, classes=[7])


def test_base_to_novel_bookkeeping_never_trains_on_novel():
    split = base_novel_split(16)
    assert split.base == tuple(range(8)) and split.novel == tuple(range(8, 16))
    labels = [i % 16 for i in range(160)]
    for shots in (None, 2, 8):
        idx = split.train_indices(labels, shots=shots, seed=1)
        assert idx and {labels[i] for i in idx} == set(split.base)
    with pytest.raises(ValueError, match=r"classes \[3\] are both base and novel"):
        type(split)((1, 3), (3, 4))
    custom = base_novel_split(5, base=[4, 0])
    assert custom.base == (0, 4) and custom.novel == (1, 2, 3) and custom.to_base_label(4) == 1

    # the training loop only ever sees base prompts and base labels
    clf = classifier()
    data = make_toy_videos([2 * c for c in range(16) for _ in range(2)], num_frames=T)
    idx = split.train_indices(data.labels.tolist(), shots=1, seed=0)
    seen = set()
    orig = clf.class_embeddings

    def spy(classes=None):
        seen.update(classes)
        return orig(classes)

    clf.class_embeddings = spy
    video_text_loss(clf, data.videos[idx], data.labels[idx], split.base).backward()
    assert seen == set(split.base)
    with pytest.raises(ValueError, match="outside the trained classes"):
        video_text_loss(clf, data.videos, data.labels, split.base)


def test_harmonic_mean():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(100.0, 0.0) == 0.0
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(50.0, 50.0) == pytest.approx(50.0)


def test_subset_zero_shot_and_base_to_novel_eval_score_against_subset_only():
    clf = classifier().eval()
    feats = F.normalize(torch.randn(12, 32), dim=-1)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5])
    with torch.no_grad():
        ce = clf.class_embeddings().float()
    # make videos 0..5 match their class exactly, 6..11 match class (label + 1) % 6
    feats[:6] = ce[labels[:6]]
    feats[6:] = ce[(labels[6:] + 1) % 6]
    acc = subset_accuracy(clf, feats, labels, [0, 1, 2, 3, 4, 5])
    assert acc["videos"] == 12
    ref = 100.0 * ((feats @ ce[:6].t()).argmax(1) == labels).float().mean().item()
    assert acc["top1"] == pytest.approx(ref)
    # on the subset {0, 2}: only videos of classes 0 and 2 count (4 videos)
    sub = subset_accuracy(clf, feats, labels, [0, 2])
    assert sub["videos"] == 4
    ref = ((feats[[0, 2, 6, 8]] @ ce[[0, 2]].t()).argmax(1) == torch.tensor([0, 1, 0, 1])).float().mean() * 100
    assert sub["top1"] == pytest.approx(ref.item())
    zs = zero_shot(clf, feats, labels, [[0, 1, 2], [3, 4, 5]])
    per = [s["top1"] for s in zs["splits"]]
    assert zs["top1_mean"] == pytest.approx(sum(per) / 2)
    b2n = base_to_novel_eval(clf, feats, labels, base_novel_split(6))
    assert b2n["hm"] == pytest.approx(harmonic_mean(b2n["base"], b2n["novel"]))


def test_read_class_split(tmp_path):
    p = tmp_path / "split1.txt"
    p.write_text("# K600 split 1\n3\n1\n\n7\n")
    assert read_class_split(str(p), 10) == [3, 1, 7]
    q = tmp_path / "split2.json"
    q.write_text(json.dumps([0, 2, 4]))
    assert read_class_split(str(q)) == [0, 2, 4]
    q.write_text(json.dumps([0, 0]))
    with pytest.raises(ValueError, match="appears twice"):
        read_class_split(str(q))
    p.write_text("1\n12\n")
    with pytest.raises(ValueError, match=r"entry 2: class index 12 outside \[0, 10\)"):
        read_class_split(str(p), 10)


# ---------------------------------------------------------------- consistency loss
def _descriptions(classes, tag):
    return {c: [f"{tag} one about {NAMES[c]}", f"{tag} two: {NAMES[c]} seen closely"] for c in classes}


def test_consistency_loss_against_direct_computation():
    model = tiny_viclip()
    frozen = copy.deepcopy(model)
    vm = vpeft.adapt(model, "msta", num_frames=T, bottleneck=16, layers=(1, 2), scale=1.0)
    classes = [0, 3, 5]
    spatial, temporal = _descriptions(classes, "looks"), _descriptions(classes, "moves")
    loss = ConsistencyLoss(vm, spatial, temporal, classes, alpha=0.7)

    def direct(desc):
        rows = []
        for c in classes:
            e = frozen.encode_text(frozen.tokenize(desc[c]))      # the tower without adapters
            rows.append(F.normalize(e.mean(0), dim=-1))
        return torch.stack(rows)

    with torch.no_grad():
        d_s, d_t = direct(spatial), direct(temporal)
        torch.testing.assert_close(loss.d_spatial, d_s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss.d_temporal, d_t, rtol=1e-5, atol=1e-6)
        w = torch.randn(3, 32)
        ref = sum(2 - F.cosine_similarity(w[i], d_s[i], 0) - F.cosine_similarity(w[i], d_t[i], 0)
                  for i in range(3)) / 3
        torch.testing.assert_close(loss(w), 0.7 * ref, rtol=1e-5, atol=1e-6)
        # a subset of rows picks the matching cached descriptions
        torch.testing.assert_close(loss(w[[2]], rows=[2]), 0.7 * (2 - F.cosine_similarity(w[2], d_s[2], 0)
                                                                   - F.cosine_similarity(w[2], d_t[2], 0)))
        # the adapted text tower is different (so bypassing the adapters mattered) and is restored
        tok = model.tokenize(spatial[0])
        adapted = model.encode_text(tok)
        assert not torch.allclose(adapted, frozen.encode_text(tok))
        with frozen_text_tower(vm):
            torch.testing.assert_close(model.encode_text(tok), frozen.encode_text(tok))
        torch.testing.assert_close(model.encode_text(tok), adapted)


def test_description_errors_name_the_class(tmp_path):
    p = tmp_path / "spatial.json"
    p.write_text(json.dumps({"0": ["a"], "1": ["b"]}))
    assert load_descriptions(str(p), [0, 1]) == {0: ["a"], 1: ["b"]}
    with pytest.raises(ValueError, match="class 2 has no descriptions"):
        load_descriptions(str(p), [0, 1, 2])
    p.write_text(json.dumps({"0": ["a"], "1": []}))
    with pytest.raises(ValueError, match="class 1 must map to a non-empty list"):
        load_descriptions(str(p), [0, 1])
    p.write_text(json.dumps({"0": ["a", 7]}))
    with pytest.raises(ValueError, match="class 0, description 1 is not a non-empty string"):
        load_descriptions(str(p), [0])


def test_long_descriptions_truncated_with_one_counting_warning():
    vm = vpeft.adapt(tiny_viclip(), "msta", num_frames=T, bottleneck=16, layers=(1, 2))
    long = "the square " * 40                     # far more than 32 tokens
    spatial = {0: [long, "short"], 1: ["short", "also short"]}
    temporal = {0: ["short"], 1: [long]}
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ConsistencyLoss(vm, spatial, temporal, [0, 1])
    msgs = [str(w.message) for w in rec if "truncated" in str(w.message)]
    assert msgs == ["2 of 6 class descriptions are longer than the text context (32 tokens) and were truncated"]


# ---------------------------------------------------------------- short run
def test_msta_few_shot_beats_untrained_on_held_out():
    """8-shot MSTA on 4 toy classes (colours, same motion) with the consistency loss:
    held-out accuracy before vs after a short CPU run. Random-init backbone, so the
    adapter scale is 0.1 rather than the released 0.005 (see README)."""
    clf = classifier(scale=0.1)
    classes = [0, 4, 8, 12]
    combos = [2 * c + s for c in classes for s in (0, 1)]
    train = make_toy_videos([c for c in combos for _ in range(4)], num_frames=T, seed=0)
    test = make_toy_videos(combos * 4, num_frames=T, seed=123)
    idx = few_shot_indices(train.labels.tolist(), 8, seed=0)
    cc = ConsistencyLoss(clf.video_model, _descriptions(classes, "looks"), _descriptions(classes, "moves"), classes)

    def acc():
        f, l = encode_videos(clf, [(test.videos, test.labels)])
        return subset_accuracy(clf, f, l, classes)["top1"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny tensors: one thread is faster on a shared machine
    try:
        before = acc()
        fit(clf, clf.parameters(), lambda e: [(train.videos[idx][i], train.labels[idx][i])
                                              for i in tensor_batches(len(idx), 8, 0, e)],
            lambda b: video_text_loss(clf, b[0], b[1], classes, cc), epochs=40, lr=1e-2, weight_decay=0.001)
        after = acc()
    finally:
        torch.set_num_threads(threads)
    print(f"MSTA 8-shot held-out top-1: before {before:.1f}%, after {after:.1f}%")
    assert after >= before + 25.0, (before, after)
