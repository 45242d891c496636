"""Video-language tasks: prompt-based recognition with MSTA's protocols and consistency
loss (:mod:`.videotext`, :mod:`.consistency`), Side4Video text-video retrieval
(:mod:`.retrieval`), and these as tasks of the one engine (:mod:`.protocols`,
:func:`build_task`)."""
from .consistency import ConsistencyLoss, consistency_loss, frozen_text_tower, load_descriptions
from .protocols import RetrievalTask, VideoTextTask, build_task
from .retrieval import RetrievalModel, TokenWiseMatching, retrieval_metrics
from .videotext import (BaseNovelSplit, VideoTextClassifier, base_novel_split, base_to_novel_eval, encode_videos,
                        few_shot_indices, harmonic_mean, read_class_split, subset_accuracy, zero_shot)

__all__ = ["ConsistencyLoss", "consistency_loss", "frozen_text_tower", "load_descriptions", "RetrievalModel",
           "TokenWiseMatching", "retrieval_metrics", "BaseNovelSplit", "VideoTextClassifier", "base_novel_split",
           "base_to_novel_eval", "encode_videos", "few_shot_indices", "harmonic_mean", "read_class_split",
           "subset_accuracy", "zero_shot", "RetrievalTask", "VideoTextTask", "build_task"]
