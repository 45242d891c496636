"""Video data: list files, frame sampling, augmentation, the dataset, and a synthetic writer."""
from .dataset import EpochSampler, VideoDataset, collate
from .lists import ListFileError, Sample, read_class_names, read_list
from .sampling import dense_indices, sample_indices, segment_indices
from .transforms import TestTransform, TrainTransform
from .video import VideoDecodeError, read_frames

__all__ = ["VideoDataset", "EpochSampler", "collate", "read_list", "read_class_names", "Sample", "ListFileError",
           "segment_indices", "dense_indices", "sample_indices", "TrainTransform", "TestTransform",
           "VideoDecodeError", "read_frames"]
