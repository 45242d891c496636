"""Video data: list files, annotation readers, frame sampling, augmentation, decoding, the dataset,
and a synthetic writer.

Names are imported on first use, so ``vpeft prepare-data`` and other light commands do not
load torch.
"""
import importlib

_WHERE = {
    "VideoDataset": "dataset", "EpochSampler": "dataset", "collate": "dataset",
    "read_list": "lists", "write_list": "lists", "read_class_names": "lists", "Sample": "lists",
    "ListFileError": "lists",
    "segment_indices": "sampling", "dense_indices": "sampling", "sample_indices": "sampling",
    "TrainTransform": "transforms", "TestTransform": "transforms",
    "VideoDecodeError": "video", "DecoderUnavailable": "video", "read_frames": "video", "open_video": "video",
    "decoder_status": "video", "available_decoders": "video",
    "prepare": "annotations", "read_annotations": "annotations",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
