"""Side4Video text-video retrieval: the retrieval head, token-wise matching and the metrics.

Video side: the side network's tokens ``(B*T, N, d)`` go through BatchNorm and a mean
over the ``N`` patches of each frame, ``(B, T, d)``; a zero-initialised bias-free
``(d -> D)`` projection maps them to the backbone width and adds them to the frozen
last-layer [CLS] of each frame; the backbone's own final LayerNorm and projection give
frame embeddings ``(B, T, E)``. At initialisation the frame embeddings are exactly the
CLIP's per-frame image embeddings.

As in the released (CLIP4Clip-based) code, the retrieval side network's position
embedding is ``(N+1, d)`` with row 0 added to the shifted [CLS], its parameters are
re-initialised by :func:`released_retrieval_init_`, and the backbone's final LayerNorm,
projection and ``logit_scale`` train too (at the text tower's small learning rate in
:class:`vpeft.tasks.protocols.RetrievalTask`, as the released run's ``coef_lr`` does).

Text side: every token's feature from the text tower (``ln_final`` then the text
projection), ``(B, L, E)``, for the tokens from start-of-text to end-of-text.

Score (token-wise fine-grained matching, DRL/Side4Video):

    s(text, video) = 0.5 * ( sum_w a_w max_t cos(w, t)  +  sum_t b_t max_w cos(w, t) )

with ``a = softmax_w(MLP_text(w))`` over the caption's tokens and
``b = softmax_t(MLP_video(t))`` over the frames (both MLPs ``N(0, 0.02)``, zero biases).
Loss: symmetric cross-entropy of ``logit_scale * s`` over the batch (text-to-video and
video-to-text).

Metrics: :func:`retrieval_metrics` (R@1, R@5, R@10, median and mean rank).
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..methods.side4video import SideNetwork, TokenBatchNorm
from ..model import VideoModel
from .videotext import tokenize

__all__ = ["RetrievalHead", "TokenWiseMatching", "RetrievalModel", "text_token_features", "retrieval_metrics",
           "ranks_of_ground_truth", "read_caption_list", "contrastive_loss"]


class RetrievalHead(nn.Module):
    """Side tokens + frozen per-frame [CLS] -> frame embeddings in the joint space.

    ``proj`` is the released ``side_proj``: a bias-free ``(d -> D)`` map, zero at start.
    """

    def __init__(self, side_width: int, backbone_width: int, num_frames: int):
        super().__init__()
        self.num_frames = num_frames
        self.norm = TokenBatchNorm(side_width)
        self.proj = nn.Linear(side_width, backbone_width, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, side_tokens: torch.Tensor, cls: torch.Tensor, tower) -> torch.Tensor:
        """``side_tokens`` ``(B*T, N, d)``, ``cls`` ``(B, T, D)`` frozen last-layer [CLS] per frame,
        ``tower`` the :class:`~vpeft.backbones.towers.VisionTower` -> ``(B, T, E)``."""
        s = self.norm(side_tokens).mean(1)                                  # (B*T, d)
        s = s.reshape(-1, self.num_frames, s.shape[-1])                     # (B, T, d)
        x = cls + self.proj(s).to(cls.dtype)
        return tower.project(tower.final_norm(x))


class TokenWiseMatching(nn.Module):
    """Weighted token-wise matching of caption tokens against frames.

    Padded words are left out of both maxima: ``-inf`` before the video-to-text max over
    words, and out of the text-to-video sum. The released code instead multiplies padded
    words' cosines by 0, so a padded word still enters the video-to-text max with cosine
    0 (it wins whenever every real word's cosine with a frame is negative); vpeft keeps
    the masked form, which is the formula of the paper and of METHODS.md.
    """

    def __init__(self, embed_dim: int, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or embed_dim
        self.text_weight = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.video_weight = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        for lin in (self.text_weight[0], self.text_weight[2], self.video_weight[0], self.video_weight[2]):
            _normal_002_(lin)

    def forward(self, words: torch.Tensor, word_mask: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """``words`` ``(Q, L, E)`` with ``word_mask`` ``(Q, L)`` (True: a real token),
        ``frames`` ``(V, T, E)`` -> scores ``(Q, V)``."""
        if not word_mask.any(1).all():
            raise ValueError("every caption needs at least one token in word_mask")
        a = self.text_weight(words).squeeze(-1).float().masked_fill(~word_mask, float("-inf")).softmax(-1)
        b = self.video_weight(frames).squeeze(-1).float().softmax(-1)
        wn = F.normalize(words.float(), dim=-1)
        fn = F.normalize(frames.float(), dim=-1)
        cos = torch.einsum("qle,vte->qvlt", wn, fn)                         # (Q, V, L, T)
        t2v = (cos.amax(3) * a[:, None, :]).masked_fill(~word_mask[:, None, :], 0.0).sum(2)
        v2t = (cos.masked_fill(~word_mask[:, None, :, None], float("-inf")).amax(2) * b[None]).sum(2)
        return 0.5 * (t2v + v2t)


def _normal_002_(lin: nn.Linear) -> None:
    """CLIP4Clip's ``init_weights`` for a Linear: weight ``N(0, 0.02)``, bias 0."""
    nn.init.normal_(lin.weight, std=0.02)
    if lin.bias is not None:
        nn.init.zeros_(lin.bias)


@torch.no_grad()
def released_retrieval_init_(side: SideNetwork) -> None:
    """Re-initialise a pre-norm side network the way the released retrieval code ends up.

    There every ``nn.Linear`` of the model is re-drawn ``N(0, 0.02)`` with zero bias
    (``Retrieval/modules/modeling.py``, ``self.apply(self.init_weights)``;
    ``until_module.py``): the ladder Linears, the attention output and the MLP. The
    attention's qkv (an ``nn.MultiheadAttention`` in-projection, not a Linear) keeps the
    side block's ``N(0, d^-0.5)`` with zero bias; the pointwise convs are ``N(0, 0.02)``
    and the depthwise temporal conv ``N(0, d^-0.5)``, their biases Conv3d's default
    (``module_clip.py``, ``AttnCBlock``). The position embedding becomes ``(N+1, d)``,
    ``N(0, 0.01)`` (:meth:`SideNetwork.add_cls_position`). Stem, norms: defaults.
    """
    d = side.pos.shape[1]
    for blk in side.blocks:
        for lin in (blk.out, blk.fc1, blk.fc2):
            _normal_002_(lin)
        nn.init.normal_(blk.qkv.weight, std=d ** -0.5)
        nn.init.zeros_(blk.qkv.bias)
        nn.init.normal_(blk.pw1.weight, std=0.02)
        nn.init.normal_(blk.pw2.weight, std=0.02)
        nn.init.normal_(blk.dw.weight, std=d ** -0.5)
    nn.init.normal_(side.ladder.weight, std=0.02)
    nn.init.zeros_(side.ladder.bias)
    side.add_cls_position(0.01)


def text_token_features(model: nn.Module, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token text features ``(B, L, E)`` (after ``ln_final`` and the projection) and the
    mask of real tokens (start-of-text .. end-of-text, the end being the highest id).

    Works for open_clip ``CLIP`` (argmax pooling) and :class:`~vpeft.backbones.viclip.ViCLIP`;
    the end-of-text row equals the model's ``encode_text``.
    """
    if hasattr(model, "text_tokens"):
        x = model.text_tokens(tokens)
    else:
        if getattr(model, "text_pool_type", "argmax") != "argmax" or not hasattr(model, "token_embedding"):
            raise ValueError(f"{type(model).__name__}: per-token text features need an open_clip CLIP with argmax "
                             "(end-of-text) pooling or a ViCLIP")
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding.to(cast)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        proj = model.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    end = tokens.argmax(dim=-1)
    mask = torch.arange(tokens.shape[1], device=tokens.device)[None] <= end[:, None]
    return x, mask


def contrastive_loss(scores: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on ``(B, B)`` text-by-video scores whose diagonal are the pairs."""
    logits = scale * scores
    target = torch.arange(scores.shape[0], device=scores.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class RetrievalModel(nn.Module):
    """Side4Video for text-video retrieval on an adapted open_clip CLIP.

    Args:
        video_model: ``vpeft.adapt(clip, "side4video", num_frames=T)`` (no classifier).
            Its side network is re-initialised for retrieval
            (:func:`released_retrieval_init_`, which also gives it the ``(N+1, d)``
            position embedding).
        train_text: also fine-tune the text tower (the paper does, with lr 1e-7); off by
            default.

    Trained: the side network, the retrieval head, the matching MLPs, and, as in the
    released run (``main_task_retrieval.py``, which re-enables them after freezing the
    encoder), the vision tower's final norm and projection and ``logit_scale``
    (:meth:`backbone_parameters`). The vision tower's blocks run without autograd
    (Side4Video's memory saving).
    """

    def __init__(self, video_model: VideoModel, train_text: bool = False):
        super().__init__()
        if not isinstance(video_model, VideoModel) or video_model.side is None:
            method = getattr(video_model, "method", type(video_model).__name__)
            raise ValueError(f"RetrievalModel needs a VideoModel with a side network (method='side4video'), "
                             f"got {method!r}")
        if video_model.tower.layout != "bt":
            raise ValueError("the retrieval head needs per-frame [CLS] tokens (a per-frame CLIP/EVA tower)")
        if video_model.text_tower is None:
            raise ValueError("retrieval needs a backbone with a text tower")
        if video_model.side.post_norm:
            raise ValueError("the retrieval side network is the released pre-norm (CLIP) one; this VideoModel has a "
                             "post-norm (EVA) side network (adapt with norm='pre')")
        self.video_model = video_model
        tower = video_model.tower
        side_width = video_model.side.pos.shape[1]
        p = next(video_model.backbone.parameters())
        released_retrieval_init_(video_model.side)
        self.head = RetrievalHead(side_width, tower.feature_dim, video_model.num_frames).to(p.device, p.dtype)
        self.matching = TokenWiseMatching(tower.embed_dim).to(p.device, p.dtype)
        self.train_text = bool(train_text)
        for q in self.backbone_parameters():
            q.requires_grad_(True)

    def backbone_parameters(self) -> List[nn.Parameter]:
        """The backbone's parameters this model trains: the vision tower's final norm and
        projection (``visual.ln_post``/``visual.proj``; a timm tower's ``norm``, ``fc_norm``
        and heads), ``logit_scale``, and with ``train_text`` the text tower."""
        tower = self.video_model.tower
        backbone = self.video_model.backbone
        v = tower.visual
        if tower.kind == "openclip_vit":
            mods = [v.ln_post]
            params = [v.proj] if isinstance(v.proj, nn.Parameter) else []
        else:
            t = v.trunk
            mods = [t.norm, t.fc_norm, t.head, v.head]
            params = []
        params += [q for m in mods for q in m.parameters()]
        if isinstance(getattr(backbone, "logit_scale", None), nn.Parameter):
            params.append(backbone.logit_scale)
        if self.train_text:
            seen = {id(q) for q in params}
            params += [q for n, q in backbone.named_parameters() if not n.startswith("visual.") and id(q) not in seen]
        return params

    def trainable_parameters(self) -> List[nn.Parameter]:
        """Side network, retrieval head, matching MLPs, then :meth:`backbone_parameters`."""
        return list(self.video_model.side.parameters()) + list(self.head.parameters()) + \
            list(self.matching.parameters()) + self.backbone_parameters()

    def trained_state_dict(self) -> Dict[str, torch.Tensor]:
        """Only the trained weights: ``video_model.*`` (side network, and the backbone parameters of
        :meth:`backbone_parameters`), ``head.*`` and ``matching.*``."""
        out = {"video_model." + k: v for k, v in self.video_model.adapter_state_dict().items()}
        text = {id(q) for q in self.backbone_parameters()}
        for n, q in self.video_model.backbone.named_parameters():
            if id(q) in text:
                out["video_model.backbone." + n] = q.detach()
        out.update({"head." + k: v for k, v in self.head.state_dict().items()})
        out.update({"matching." + k: v for k, v in self.matching.state_dict().items()})
        return out

    def load_trained_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load :meth:`trained_state_dict`'s output; a missing or unexpected key is an error naming it."""
        own = set(self.trained_state_dict())
        missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
        if missing or unexpected:
            raise ValueError(f"retrieval weights do not match this model: missing {missing[:8]}, "
                             f"unexpected {unexpected[:8]}")
        vm = {k[len("video_model."):]: v for k, v in state.items() if k.startswith("video_model.")}
        adapters = self.video_model._trained_keys()
        self.video_model.load_adapter_state_dict({k: v for k, v in vm.items() if k in adapters})
        rest = {k[len("backbone."):]: v for k, v in vm.items() if k not in adapters}   # backbone_parameters()
        if rest:
            self.video_model.backbone.load_state_dict(rest, strict=False)
        self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
        self.matching.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("matching.")})

    def pretrained_config(self) -> Dict:
        """The ``adapter_config.json`` record of this model (kind ``retrieval``)."""
        from ..pretrained import adapter_config

        return adapter_config(self.video_model, kind="retrieval", extra={"train_text": self.train_text})

    def save_pretrained(self, directory: str) -> str:
        """``adapter_config.json`` and ``adapter_model.safetensors`` with :meth:`trained_state_dict`;
        rebuild with :func:`vpeft.from_pretrained`."""
        from ..pretrained import save_pretrained

        return save_pretrained(directory, self.pretrained_config(), self.trained_state_dict())

    def train(self, mode: bool = True):
        super().train(mode)
        self.video_model.train(mode)
        return self

    @property
    def logit_scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` of the backbone (trained, as in the released run)."""
        return self.video_model.backbone.logit_scale.exp()

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        return tokenize(self.video_model.backbone, captions)

    def frame_embeddings(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` -> ``(B, T, E)``."""
        vm = self.video_model
        video = vm._check_video(video)
        b, t = video.shape[:2]
        ids = tuple(vm.side.layer_ids)
        with torch.no_grad():
            last, feats = vm._tokens(video.flatten(0, 1), keep=ids)
            feats = [vm.tower.side_view(f) for f in feats]
            pooled = vm.tower.pool_tokens(last).reshape(b, t, -1)   # per-frame [CLS] (or the model's pooling)
        side = vm.side(video.transpose(1, 2), feats)
        return self.head(side, pooled, vm.tower)

    def text_embeddings(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token ids -> per-token features ``(B, L, E)`` and mask."""
        backbone = self.video_model.backbone
        tokens = tokens.to(next(backbone.parameters()).device)
        if self.train_text and self.training:
            return text_token_features(backbone, tokens)
        with torch.no_grad():
            return text_token_features(backbone, tokens)

    def scores(self, tokens: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """``(Q, V)`` text-by-video scores."""
        words, mask = self.text_embeddings(tokens)
        return self.matching(words, mask, self.frame_embeddings(video))

    def forward(self, tokens: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """Symmetric contrastive loss of a batch of matching (caption, video) pairs."""
        return contrastive_loss(self.scores(tokens, video), self.logit_scale)

    @torch.no_grad()
    def similarity_matrix(self, tokens: torch.Tensor, videos: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Scores of every caption against every video, ``(Q, V)``, embedding each once."""
        was = self.training
        self.eval()
        try:
            frames = torch.cat([self.frame_embeddings(videos[i:i + batch_size])
                                for i in range(0, len(videos), batch_size)])
            words, mask = self.text_embeddings(tokens)
            return torch.cat([self.matching(words[i:i + batch_size], mask[i:i + batch_size], frames)
                              for i in range(0, len(words), batch_size)])
        finally:
            self.train(was)


# ---------------------------------------------------------------------- metrics
def ranks_of_ground_truth(sim: torch.Tensor, gt: Sequence[Sequence[int]]) -> torch.Tensor:
    """1-based rank of the best-ranked ground-truth item of each query (row of ``sim``).

    Ties are ranked pessimistically: an item scoring the same as the ground truth
    counts as ranked before it, so the rank of an item with score ``s`` is the number
    of items scoring ``>= s``. (A constant similarity matrix therefore ranks every
    ground truth last, never first.) With several ground-truth items the best (lowest)
    of their ranks is used.
    """
    ranks = []
    for q, items in enumerate(gt):
        if not items:
            raise ValueError(f"query {q} has no ground-truth item")
        row = sim[q]
        ranks.append(min(int((row >= row[i]).sum()) for i in items))
    return torch.tensor(ranks, dtype=torch.float64)


def _summary(ranks: torch.Tensor) -> Dict[str, float]:
    return {"R@1": 100.0 * (ranks <= 1).double().mean().item(),
            "R@5": 100.0 * (ranks <= 5).double().mean().item(),
            "R@10": 100.0 * (ranks <= 10).double().mean().item(),
            "MdR": float(ranks.median().item()) if len(ranks) % 2 else float(ranks.sort().values[
                len(ranks) // 2 - 1: len(ranks) // 2 + 1].mean().item()),
            "MnR": float(ranks.mean().item())}


def retrieval_metrics(sim: torch.Tensor, caption_to_video: Optional[Sequence[int]] = None) -> Dict[str, Dict[str, float]]:
    """Text-to-video and video-to-text R@1, R@5, R@10 (in %), median (MdR) and mean (MnR) rank.

    ``sim`` is ``(captions, videos)``; ``caption_to_video[q]`` is caption ``q``'s video
    (default: the diagonal, one caption per video). Video-to-text ranks a video's
    captions among all captions and takes the best. Ties: see :func:`ranks_of_ground_truth`.
    The median of an even number of ranks is the mean of the two middle ones.
    """
    q, v = sim.shape
    if caption_to_video is None:
        if q != v:
            raise ValueError(f"sim is {q}x{v}; give caption_to_video when captions and videos differ in number")
        caption_to_video = list(range(q))
    caption_to_video = [int(i) for i in caption_to_video]
    if len(caption_to_video) != q:
        raise ValueError(f"caption_to_video has {len(caption_to_video)} entries for {q} captions")
    bad = [i for i in caption_to_video if not 0 <= i < v]
    if bad:
        raise ValueError(f"caption_to_video names videos {bad[:5]} outside [0, {v})")
    sim = sim.detach().double().cpu()
    t2v = ranks_of_ground_truth(sim, [[i] for i in caption_to_video])
    captions_of: List[List[int]] = [[] for _ in range(v)]
    for c, i in enumerate(caption_to_video):
        captions_of[i].append(c)
    with_captions = [i for i in range(v) if captions_of[i]]
    v2t = ranks_of_ground_truth(sim.t()[with_captions], [captions_of[i] for i in with_captions])
    return {"t2v": _summary(t2v), "v2t": _summary(v2t)}


def read_caption_list(path: str) -> List[Tuple[str, str]]:
    """A retrieval list file: one ``relative/video/path<TAB>caption`` per line (blank lines
    and ``#`` lines skipped). Errors name the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption list {path!r} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if "\t" not in line:
                raise ValueError(f"{path}:{n}: expected 'video<TAB>caption', got {line[:60]!r}")
            video, caption = line.split("\t", 1)
            if not video.strip() or not caption.strip():
                raise ValueError(f"{path}:{n}: empty video path or caption")
            out.append((video.strip(), caption.strip()))
    if not out:
        raise ValueError(f"{path}: no (video, caption) pairs")
    return out
