"""Side4Video text-video retrieval: head, token-wise matching, metrics, a short run."""
import open_clip
import pytest
import torch
import torch.nn.functional as F

import vpeft
from vpeft.backbones.viclip import create_viclip
from vpeft.tasks.retrieval import (RetrievalModel, TokenWiseMatching, read_caption_list, retrieval_metrics,
                                   text_token_features)
from toy_data import fit, tensor_batches, toy_split

T = 4


def text_clip():
    """A small open_clip CLIP whose text tower takes real BPE tokens (full vocabulary, context 32)."""
    return open_clip.CLIP(
        embed_dim=32,
        vision_cfg=dict(layers=4, width=64, patch_size=8, image_size=32, head_width=32),
        text_cfg=dict(context_length=32, vocab_size=49408, width=32, heads=2, layers=2),
    ).eval()


def retrieval_model(**kw):
    vm = vpeft.adapt(text_clip(), "side4video", num_frames=T, side_width=64, side_layers=2)
    return RetrievalModel(vm, **kw)


# ---------------------------------------------------------------- metrics
def test_metrics_on_hand_computed_matrix_with_ties():
    sim = torch.tensor([[0.9, 0.1, 0.9],     # caption 0 ties with video 2 -> ranked 2nd (pessimistic)
                        [0.2, 0.8, 0.1],     # caption 1 -> 1st
                        [0.5, 0.6, 0.3]])    # caption 2 -> 3rd
    m = retrieval_metrics(sim)
    assert m["t2v"]["R@1"] == pytest.approx(100 / 3)
    assert m["t2v"]["R@5"] == 100.0 and m["t2v"]["R@10"] == 100.0
    assert m["t2v"]["MdR"] == 2.0 and m["t2v"]["MnR"] == pytest.approx(2.0)
    # video-to-text: columns. video 2's column is (0.9, 0.1, 0.3): caption 2 is 2nd
    assert m["v2t"]["R@1"] == pytest.approx(200 / 3)
    assert m["v2t"]["MdR"] == 1.0 and m["v2t"]["MnR"] == pytest.approx(4 / 3)


def test_metrics_constant_matrix_ranks_last_and_r10():
    m = retrieval_metrics(torch.zeros(12, 12))
    for side in ("t2v", "v2t"):
        assert m[side]["R@1"] == 0.0 and m[side]["R@10"] == 0.0
        assert m[side]["MdR"] == 12.0 and m[side]["MnR"] == 12.0
    # a 12x12 matrix where the ground truth is ranked i+1 for query i
    sim = torch.zeros(12, 12)
    for q in range(12):
        order = [v for v in range(12) if v != q]
        sim[q, q] = 0.5
        for j, v in enumerate(order[:q]):
            sim[q, v] = 1.0 - 0.01 * j   # q videos above the ground truth
    t2v = retrieval_metrics(sim)["t2v"]
    assert t2v["R@1"] == pytest.approx(100 / 12) and t2v["R@5"] == pytest.approx(500 / 12)
    assert t2v["R@10"] == pytest.approx(1000 / 12)
    assert t2v["MdR"] == 6.5 and t2v["MnR"] == 6.5


def test_metrics_several_captions_per_video():
    sim = torch.tensor([[0.1, 0.5], [0.7, 0.2], [0.3, 0.9]])
    m = retrieval_metrics(sim, caption_to_video=[0, 0, 1])
    assert m["t2v"]["MnR"] == pytest.approx(4 / 3)         # ranks 2, 1, 1
    assert m["v2t"]["R@1"] == 100.0                         # video 0: best of captions 0 (3rd) and 1 (1st)
    with pytest.raises(ValueError, match="give caption_to_video"):
        retrieval_metrics(torch.zeros(3, 2))


# ---------------------------------------------------------------- matching and head
def test_token_wise_matching_against_loops():
    torch.manual_seed(1)
    m = TokenWiseMatching(8)
    for mlp in (m.text_weight, m.video_weight):
        torch.nn.init.normal_(mlp[2].weight)
    words, frames = torch.randn(3, 5, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    out = m(words, mask, frames)
    for q in range(3):
        w = words[q, mask[q]]
        a = m.text_weight(w).squeeze(-1).softmax(0)
        for v in range(2):
            b = m.video_weight(frames[v]).squeeze(-1).softmax(0)
            cos = F.normalize(w, dim=-1) @ F.normalize(frames[v], dim=-1).t()      # (words, frames)
            ref = 0.5 * ((a * cos.max(1).values).sum() + (b * cos.max(0).values).sum())
            torch.testing.assert_close(out[q, v], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factory", ["clip", "viclip"])
def test_text_token_features_end_token_is_encode_text(factory):
    model = text_clip() if factory == "clip" else create_viclip(
        None, image_size=32, patch_size=8, vision_width=64, vision_layers=1, vision_heads=2, num_frames=T,
        text_width=32, text_layers=2, text_heads=2, embed_dim=32).eval()
    tok = open_clip.tokenize(["a small red square moving left", "hi"], context_length=32)
    x, mask = text_token_features(model, tok)
    with torch.no_grad():
        torch.testing.assert_close(x[torch.arange(2), tok.argmax(-1)], model.encode_text(tok))
    assert mask.sum(1).tolist() == [int((t != 0).sum()) for t in tok]


def test_retrieval_head_starts_at_frozen_clip_frame_embeddings():
    rm = retrieval_model().eval()
    video = torch.randn(2, T, 3, 32, 32)
    with torch.no_grad():
        frames = rm.frame_embeddings(video)
        ref = rm.video_model.backbone.encode_image(video.flatten(0, 1)).reshape(2, T, -1)
    torch.testing.assert_close(frames, ref, rtol=1e-5, atol=1e-5)


def test_retrieval_trains_released_scope_and_refuses_viclip():
    rm = retrieval_model()
    video = torch.randn(3, T, 3, 32, 32)
    tok = rm.tokenize(["a", "b c", "d e f"])
    rm.train()
    rm(tok, video).backward()
    # of the backbone only the vision tower's final norm, its projection and logit_scale (released scope)
    got = {n for n, p in rm.video_model.backbone.named_parameters() if p.grad is not None}
    assert got == {"visual.ln_post.weight", "visual.ln_post.bias", "visual.proj", "logit_scale"}
    assert rm.head.proj.weight.grad is not None and rm.video_model.side.pos.grad is not None
    vm = vpeft.adapt(create_viclip(None, image_size=32, patch_size=8, vision_width=64, vision_layers=1,
                                   vision_heads=2, num_frames=T, text_width=32, text_layers=1, text_heads=2),
                     "linear_probe", num_frames=T)
    with pytest.raises(ValueError, match="method='side4video'"):
        RetrievalModel(vm)


def test_read_caption_list(tmp_path):
    p = tmp_path / "test.txt"
    p.write_text("# video\tcaption\nv/0001.mp4\ta red square moving left\n\nv/0002.mp4\tsomething, with\ttab\n")
    assert read_caption_list(str(p)) == [("v/0001.mp4", "a red square moving left"),
                                         ("v/0002.mp4", "something, with\ttab")]
    p.write_text("v/0001.mp4 no tab here\n")
    with pytest.raises(ValueError, match="test.txt:1: expected 'video<TAB>caption'"):
        read_caption_list(str(p))


# ---------------------------------------------------------------- short run
def test_side4video_retrieval_beats_untrained_on_held_out():
    """A short CPU run on toy captioned clips; held-out clips have unseen positions and noise."""
    torch.manual_seed(0)
    rm = retrieval_model()
    train, test = toy_split(3, num_frames=T, seed=0, combos=range(0, 32, 2))     # 16 captions
    tok_train, tok_test = rm.tokenize(train.captions), rm.tokenize(test.captions)

    def r1():
        sim = rm.similarity_matrix(tok_test, test.videos)
        m = retrieval_metrics(sim)
        return m["t2v"]["R@1"], m["t2v"]["MnR"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = r1()
        fit(rm, rm.trainable_parameters(),
            lambda e: [(train.videos[i], tok_train[i]) for i in tensor_batches(len(train.captions), 8, 0, e)],
            lambda b: rm(b[1], b[0]), epochs=15, lr=2e-3)
        after = r1()
    finally:
        torch.set_num_threads(threads)
    print(f"Side4Video retrieval held-out t2v (R@1, MnR): before {before}, after {after}")
    assert after[0] > before[0] + 10.0 and after[1] < before[1], (before, after)
