"""Reading frames from videos and frame folders, with one of several decoders.

One entry point, :func:`read_frames` (and :func:`open_video` for a source kept open).
Three decoder backends give the same ``uint8`` RGB frames for the same indices:

* ``decord`` (optional extra ``vpeft[decord]``): fast, but unmaintained since 2022.
* ``torchcodec`` (optional extra ``vpeft[torchcodec]``): PyTorch's decoder; it needs a
  system FFmpeg (4 to 9) and a torchcodec release built for the installed torch.
* ``pyav`` (a required dependency, it ships its own FFmpeg): decodes sparsely. It scans
  the packet index once (no decoding), seeks to the keyframe at or before each group of
  wanted frames, decodes forward and stops at the last wanted frame, keeping only the
  wanted frames. Memory is bounded by the wanted frames, not the video's length.

Frame ``i`` is the ``i``-th frame in presentation-timestamp order on every backend, so
variable-frame-rate files and files with B-frames give identical frames everywhere.

``decoder="auto"`` tries decord, then torchcodec, then PyAV: the first that imports and
opens (and decodes) the file wins. :func:`decoder_status` tells which backends can load
here and why the others cannot.

A path that is a directory is a frame folder: images named by a template
(``img_{:05d}.jpg`` from 1 by default, mmaction2's layout). A clip can be trimmed to
``[start, end)`` seconds of a video (untrimmed Kinetics downloads); the window is found
from the packets' presentation timestamps, the same window for every backend.
"""
from __future__ import annotations

import bisect
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

log = logging.getLogger("vpeft.data")

from ..engine.config import DECODER_CHOICES, DECODERS  # noqa: E402,F401 - the schema declares them (one place)
DEFAULT_FRAME_TEMPLATE = "img_{:05d}.jpg"

Indices = Union[Sequence[int], Callable[[int], Sequence[int]]]


class VideoDecodeError(RuntimeError):
    """A video that is missing, empty, too short or cannot be decoded; the message names the file."""


class DecoderUnavailable(ValueError):
    """A decoder backend that cannot be loaded here; the message says why and how to get it."""


# ----------------------------------------------------------------- which backends load
_STATUS: Dict[str, Optional[str]] = {}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[-1] if text else ''}".rstrip(": ")


def _probe(name: str) -> Optional[str]:
    try:
        if name == "decord":
            import decord  # noqa: F401
        elif name == "torchcodec":
            import torchcodec.decoders  # noqa: F401  (loads the FFmpeg libraries it finds)
        elif name == "pyav":
            import av  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any load failure (missing package, missing FFmpeg, ABI mismatch)
        extra = {"decord": "pip install 'vpeft[decord]'",
                 "torchcodec": "pip install 'vpeft[torchcodec]' and a system FFmpeg 4-9 (e.g. apt install ffmpeg)",
                 "pyav": "pip install av"}[name]
        return f"{name} cannot be loaded ({_first_line(e)}); to use it: {extra}"
    return None


def _loads(name: str) -> Optional[str]:
    """``None`` when backend ``name`` loads here, else the reason (probed once per process)."""
    if name not in _STATUS:
        _STATUS[name] = _probe(name)
    return _STATUS[name]


def decoder_status() -> Dict[str, Optional[str]]:
    """``{backend: None}`` for each backend that loads here, ``{backend: reason}`` for the others."""
    return {name: _loads(name) for name in DECODERS}


def available_decoders() -> List[str]:
    """The backends that load here, in ``auto`` order."""
    return [n for n, why in decoder_status().items() if why is None]


_ANNOUNCED: set = set()


def resolve_decoder(choice: str, *, announce: bool = True) -> Tuple[str, ...]:
    """The backends to try, in order, for ``data.decoder=choice``.

    ``auto`` gives the first backend that loads here (decord, torchcodec, PyAV order)
    followed by the later ones, which are only loaded if a file needs them (importing
    torchcodec takes seconds); a named backend gives just that one and raises
    :class:`DecoderUnavailable` (with the reason) when it cannot load. With ``announce``
    the choice is logged once per process.
    """
    if choice not in DECODER_CHOICES:
        raise ValueError(f"unknown video decoder {choice!r} (data.decoder); expected one of {DECODER_CHOICES}")
    if choice == "auto":
        first = next((n for n in DECODERS if _loads(n) is None), None)
        if first is None:
            raise DecoderUnavailable("no video decoder can be loaded: " + "; ".join(
                v for v in decoder_status().values() if v))
        order = (first,) + DECODERS[DECODERS.index(first) + 1:]
    else:
        if _loads(choice) is not None:
            raise DecoderUnavailable(f"data.decoder={choice}: {_STATUS[choice]}")
        order = (choice,)
    if announce and choice not in _ANNOUNCED:
        _ANNOUNCED.add(choice)
        if choice == "auto":
            skipped = "; ".join(f"{n} skipped: {_STATUS[n]}" for n in DECODERS[:DECODERS.index(order[0])])
            log.info("video decoder: %s (data.decoder=auto%s%s)", order[0],
                     f"; then {', '.join(order[1:])} for a file it cannot read" if len(order) > 1 else "",
                     f"; {skipped}" if skipped else "")
        else:
            log.info("video decoder: %s (data.decoder=%s)", choice, choice)
    return order


# ----------------------------------------------------------------- sources
class _Source:
    """An open video or frame folder: ``num_frames`` and ``get(sorted unique indices)``."""

    num_frames: int

    def get(self, indices: List[int]) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class _DecordSource(_Source):
    def __init__(self, path: str):
        import decord

        self._vr = decord.VideoReader(path, num_threads=1)
        self.num_frames = len(self._vr)

    def get(self, indices):
        return self._vr.get_batch(list(indices)).asnumpy()

    def close(self):
        del self._vr


class _TorchcodecSource(_Source):
    def __init__(self, path: str):
        from torchcodec.decoders import VideoDecoder

        self._dec = VideoDecoder(path, seek_mode="exact", dimension_order="NHWC", num_ffmpeg_threads=1)
        self.num_frames = len(self._dec)

    def get(self, indices):
        return self._dec.get_frames_at(list(indices)).data.numpy()

    def close(self):
        del self._dec


def _packet_index(container, stream) -> Tuple[List[int], List[int]]:
    """``(presentation timestamps of all frames, of the keyframes)``, both sorted, read from
    the demuxed packets without decoding anything."""
    pts, keys = [], []
    for pkt in container.demux(stream):
        if pkt.size == 0:          # the demuxer's end-of-stream marker
            continue
        if pkt.pts is None:
            raise VideoDecodeError("a packet has no presentation timestamp")
        pts.append(int(pkt.pts))
        if pkt.is_keyframe:
            keys.append(int(pkt.pts))
    pts.sort()
    keys.sort()
    return pts, keys


class _PyAVSource(_Source):
    """Sparse PyAV decoding: keyframe seek per group of wanted frames, decode forward, stop."""

    def __init__(self, path: str):
        import av

        self._c = av.open(path)
        try:
            if not self._c.streams.video:
                raise VideoDecodeError("no video stream")
            self._s = self._c.streams.video[0]
            self._s.codec_context.thread_count = 1
            self.pts, keys = _packet_index(self._c, self._s)
        except Exception:
            self._c.close()
            raise
        self._key_pts = keys
        self.num_frames = len(self.pts)
        self.decoded_frames = 0        # frames decoded so far (the sparse-decoding test counts them)

    def _frames_from(self, key: int):
        """Decoder output after seeking to keyframe number ``key`` (-1: the start of the stream).

        Seeking by the keyframe's pts lands on it for demuxers that index by pts (mp4); one
        that lands later is caught in :meth:`get`, which then seeks one keyframe earlier."""
        target = self._key_pts[key] if key >= 0 else (self._s.start_time or 0)
        self._c.seek(target, stream=self._s, backward=True, any_frame=False)
        return self._c.decode(self._s)

    def get(self, indices):
        want = [self.pts[i] for i in indices]
        wanted = set(want)
        got: Dict[int, np.ndarray] = {}
        frames, pos = None, None          # the running decoder output and the last pts it gave
        for p in want:
            if p in got:
                continue
            key = bisect.bisect_right(self._key_pts, p) - 1
            if frames is None or pos is None or (key >= 0 and self._key_pts[key] > pos):
                frames = self._frames_from(key)
                pos = None
            while p not in got:
                frame = next(frames, None)
                if frame is None:
                    raise VideoDecodeError(f"frame at pts {p} is in the packet index but was not decoded "
                                           f"(truncated or corrupt file)")
                self.decoded_frames += 1
                if frame.pts is None:
                    raise VideoDecodeError("a decoded frame has no presentation timestamp")
                if pos is None and frame.pts > p:   # the seek landed after the wanted frame
                    if key < 0:
                        raise VideoDecodeError(f"frame at pts {p} precedes the first decodable frame")
                    key -= 1
                    frames = self._frames_from(key)
                    continue
                pos = frame.pts
                if frame.pts in wanted and frame.pts not in got:
                    got[frame.pts] = frame.to_ndarray(format="rgb24")
                if frame.pts > p and p not in got:
                    raise VideoDecodeError(f"frame at pts {p} was skipped by the decoder (corrupt file)")
        return np.stack([got[p] for p in want])

    def close(self):
        self._c.close()


class _FrameFolder(_Source):
    """A directory of images ``template.format(start_index + i)``, ``i = 0 .. n - 1``."""

    def __init__(self, path: str, template: str, start_index: int):
        try:
            template.format(start_index)
        except (IndexError, KeyError, ValueError) as e:
            raise ValueError(f"frame template {template!r} (data.frame_template) must take one integer "
                             f"with str.format, e.g. 'img_{{:05d}}.jpg' ({e})") from None
        names = set(os.listdir(path))
        n = 0
        while template.format(start_index + n) in names:
            n += 1
        if n == 0:
            raise VideoDecodeError(f"frame folder has no {template.format(start_index)!r} "
                                   f"(data.frame_template={template!r}, data.frame_start_index={start_index})")
        self.path, self.template, self.start, self.num_frames = path, template, start_index, n

    def get(self, indices):
        from PIL import Image

        out = []
        for i in indices:
            with Image.open(os.path.join(self.path, self.template.format(self.start + i))) as im:
                out.append(np.asarray(im.convert("RGB")))
        shapes = {a.shape for a in out}
        if len(shapes) != 1:
            raise VideoDecodeError(f"frames of different sizes {sorted(shapes)}")
        return np.stack(out)


class _Window(_Source):
    """Frames ``[first, first + num_frames)`` of another source."""

    def __init__(self, inner: _Source, first: int, count: int):
        self.inner, self.first, self.num_frames = inner, first, count

    def get(self, indices):
        return self.inner.get([self.first + i for i in indices])

    def close(self):
        self.inner.close()


_OPENERS = {"decord": _DecordSource, "torchcodec": _TorchcodecSource, "pyav": _PyAVSource}


def frame_times(path: str) -> np.ndarray:
    """Presentation time in seconds of every frame of ``path`` (from the stream start), in
    presentation order, read from the packet index with PyAV (nothing is decoded)."""
    import av

    with av.open(path) as c:
        if not c.streams.video:
            raise VideoDecodeError(f"{path}: no video stream")
        s = c.streams.video[0]
        pts, _ = _packet_index(c, s)
        tb = float(s.time_base)
        origin = s.start_time if s.start_time is not None else (pts[0] if pts else 0)
    return (np.asarray(pts, dtype=np.float64) - origin) * tb


def _trim_window(path: str, start: Optional[float], end: Optional[float]) -> Tuple[int, int]:
    t = frame_times(path)
    lo = 0 if start is None else int(np.searchsorted(t, float(start) - 1e-6, side="left"))
    hi = len(t) if end is None else int(np.searchsorted(t, float(end) - 1e-6, side="left"))
    return lo, max(hi - lo, 0)


def open_video(path: str, decoder: Union[str, Sequence[str]] = "auto", *, start: Optional[float] = None,
               end: Optional[float] = None, frame_template: str = DEFAULT_FRAME_TEMPLATE,
               frame_start_index: int = 1) -> _Source:
    """Open ``path`` (a video file or a frame folder) for :meth:`get`; close it when done.

    ``decoder`` is a ``data.decoder`` choice or an explicit order of backends (as
    :func:`resolve_decoder` returns). The first backend that opens the file is used;
    when every one fails, :class:`VideoDecodeError` lists each backend's reason.
    ``start``/``end`` (seconds) trim a video file to that window.
    """
    if os.path.isdir(path):
        if start is not None or end is not None:
            raise VideoDecodeError(f"{path}: start/end trimming needs a video file, not a frame folder")
        try:
            return _FrameFolder(path, frame_template, frame_start_index)
        except VideoDecodeError as e:
            raise VideoDecodeError(f"{path}: {e}") from None
    if not os.path.isfile(path):
        raise VideoDecodeError(f"{path}: file does not exist")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(f"{path}: file is empty (0 bytes)")
    order = resolve_decoder(decoder) if isinstance(decoder, str) else tuple(decoder)
    window = None
    if start is not None or end is not None:
        try:
            window = _trim_window(path, start, end)
        except Exception as e:  # noqa: BLE001 - an unreadable file is a decode error
            raise VideoDecodeError(f"{path}: cannot read its timestamps to trim it ({_first_line(e)})") from None
        if window[1] == 0:
            raise VideoDecodeError(f"{path}: no frames between start={start} and end={end} seconds")
    errors = []
    for name in order:
        if _loads(name) is not None:
            errors.append(f"{name}: cannot be loaded")
            continue
        try:
            src = _OPENERS[name](path)
        except Exception as e:  # noqa: BLE001 - any failure to open means "try the next backend"
            errors.append(f"{name}: {_first_line(e)}")
            continue
        if src.num_frames < 1:
            src.close()
            errors.append(f"{name}: no video frames")
            continue
        src.backend = name
        if window is not None:
            first, count = window[0], min(window[1], src.num_frames - window[0])
            if count < 1:
                src.close()
                raise VideoDecodeError(f"{path}: {name} sees {src.num_frames} frames, none between "
                                       f"start={start} and end={end} seconds")
            w = _Window(src, first, count)
            w.backend = name
            return w
        return src
    raise VideoDecodeError(f"{path}: cannot open ({'; '.join(errors)})")


_FALLBACK_LOGGED: set = set()


class _CallerMistake(Exception):
    """Carries a ValueError / IndexError about the asked indices (not about the file) out of
    :func:`read_frames`' decode guard, so that a backend's own ValueError subclasses (PyAV's
    ``InvalidDataError``) still count as an undecodable file."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _wanted(path: str, indices, n: int) -> Tuple[List[int], List[int]]:
    """The asked frame indices and their sorted unique set, checked against ``n`` frames."""
    try:
        want = [int(i) for i in (indices(n) if callable(indices) else indices)]
        if not want:
            raise ValueError(f"no frame indices asked of {path}")
        bad = [i for i in want if not 0 <= i < n]
        if bad:
            raise IndexError(f"{path}: frame indices {bad[:5]} outside [0, {n})")
    except (ValueError, IndexError) as e:
        raise _CallerMistake(e) from None
    return want, sorted(set(want))


def read_frames(path: str, indices: Indices, *, decoder: Union[str, Sequence[str]] = "auto",
                start: Optional[float] = None, end: Optional[float] = None,
                frame_template: str = DEFAULT_FRAME_TEMPLATE, frame_start_index: int = 1,
                min_frames: int = 1) -> np.ndarray:
    """Frames ``indices`` of ``path`` as ``uint8 (K, H, W, 3)`` RGB, in the order asked.

    Args:
        path: a video file, or a frame folder (see ``frame_template``).
        indices: frame indices (repeats allowed), or a function of the number of frames
            returning them (how clip samplers use it).
        decoder: ``auto``, ``decord``, ``torchcodec``, ``pyav``, or an order of backends.
            With ``auto`` a backend that opens the file but fails to decode it hands the
            file to the next one.
        start, end: trim a video file to ``[start, end)`` seconds first.
        frame_template, frame_start_index: frame-folder file names.
        min_frames: fewer frames than this is an error ("too short").

    Raises:
        VideoDecodeError: missing, empty, corrupt, truncated or too short, naming the file
            and every backend's reason.
    """
    remaining = list(resolve_decoder(decoder) if isinstance(decoder, str) else decoder)
    errors: List[str] = []
    while True:
        try:
            src = open_video(path, remaining, start=start, end=end, frame_template=frame_template,
                             frame_start_index=frame_start_index)
        except VideoDecodeError as e:
            if not errors:
                raise
            raise VideoDecodeError(f"{e}; before that: {'; '.join(errors)}") from None
        name = getattr(src, "backend", "frames")
        try:
            n = src.num_frames
            if n < min_frames:
                raise VideoDecodeError(f"{path}: too short: {n} frames, at least {min_frames} needed "
                                       f"(data.min_frames)")
            want, uniq = _wanted(path, indices, n)
            frames = src.get(uniq)
            if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] != len(uniq) or frames.dtype != np.uint8:
                raise VideoDecodeError(f"decoded frames have shape {frames.shape} and dtype {frames.dtype}")
            pos = {f: j for j, f in enumerate(uniq)}
            return frames[[pos[i] for i in want]]
        except _CallerMistake as e:
            raise e.error from None             # the caller's mistake, not the file's
        except Exception as e:  # noqa: BLE001 - the backend opened the file but could not decode it
            # (this includes a backend's own ValueError subclasses, e.g. PyAV's InvalidDataError)
            if name == "frames" or (isinstance(e, VideoDecodeError) and "too short" in str(e)):
                raise VideoDecodeError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
            errors.append(f"{name}: {_first_line(e)}")
        finally:
            src.close()
        remaining = remaining[remaining.index(name) + 1:]
        if not remaining:
            raise VideoDecodeError(f"{path}: cannot decode ({'; '.join(errors)})")
        if not _FALLBACK_LOGGED:
            _FALLBACK_LOGGED.add(name)
            log.warning("%s opened %s but could not decode it (%s); trying %s (further fallbacks are not logged)",
                        name, path, errors[-1], ", ".join(remaining))
