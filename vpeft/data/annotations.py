"""Readers for the annotation files the standard video datasets ship with.

Each reader turns a dataset's own files into vpeft's sample list (:class:`Sample`:
path relative to the video root, label, optional trim window) and its class names, or,
for MSR-VTT, into ``(video, caption)`` pairs for retrieval:

==========  ==============================================================================
``ssv2``     ``something-something-v2-{train,validation}.json`` + ``labels.json``; the
             label is the ``template`` with its brackets removed, looked up in labels.json.
``kinetics`` ``kinetics*_{train,val}.csv`` (header with ``youtube_id``, ``time_start``,
             ``time_end``, ``label``; other columns ignored); classes sorted by name.
``ucf101``   ``trainlistNN.txt`` / ``testlistNN.txt`` + ``classInd.txt``.
``hmdb51``   the folder of ``<class>_test_split<N>.txt`` files (1 = train, 2 = test).
``msrvtt``   ``MSRVTT_data.json`` (or ``train_val_videodatainfo.json``) captions with a
             split CSV: ``MSRVTT_train.9k.csv`` (video ids: every caption of each video) or
             ``MSRVTT_JSFUSION_test.csv`` (the 1k-A test: one sentence per video).
``mmaction`` mmaction2 lists: ``path label`` (videos) or ``dir total_frames label`` (frames).
==========  ==============================================================================

A malformed entry does not stop a reader: it is recorded as ``FILE:LINE: what is wrong``
in :attr:`Annotations.problems` and left out. :func:`locate_videos` then finds each
entry's video under the video root (any extension, or a frame folder; Kinetics clips
trimmed or untrimmed) and gathers the missing ones, which :func:`prepare` reports as one
summary line and a file of names.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field, replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .lists import ListFileError, Sample, read_class_names, write_list
from .video import DEFAULT_FRAME_TEMPLATE

FORMATS = ("ssv2", "kinetics", "ucf101", "hmdb51", "msrvtt", "mmaction")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".ogv", ".3gp")


@dataclass
class Entry:
    """One annotation entry: where it was read, the candidate relative paths of its video
    (first is the dataset's default), its label or caption, and an optional trim window
    that applies when the video found is the untrimmed one (``untrimmed`` candidates)."""

    where: str
    candidates: List[str]
    label: int = -1
    caption: Optional[str] = None
    untrimmed: List[str] = field(default_factory=list)
    start: Optional[float] = None
    end: Optional[float] = None


@dataclass
class Annotations:
    """A reader's output: entries, class names (``None`` for captions), and problems."""

    entries: List[Entry]
    class_names: Optional[List[str]]
    problems: List[str]

    def __post_init__(self):
        # file order as first reported, line order within a file
        files: Dict[str, int] = {}
        for p in self.problems:
            files.setdefault(p.split(":", 1)[0], len(files))

        def key(p: str):
            file, _, rest = p.partition(":")
            line = rest.split(":", 1)[0]
            return files[file], int(line) if line.isdigit() else 0

        self.problems = sorted(self.problems, key=key)


# ----------------------------------------------------------------- JSON with line numbers
_WS = re.compile(r"\s*")


def _skip(text: str, i: int) -> int:
    return _WS.match(text, i).end()


def _line(text: str, i: int) -> int:
    return text.count("\n", 0, i) + 1


def _load_json_text(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise ListFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    return text


def _json_children(text: str, i: int) -> Iterator[Tuple[int, Optional[str], int, object]]:
    """``(line, key, value offset, value)`` for each child of the JSON array or object at
    ``text[i]`` (``key`` is ``None`` in an array; ``line`` is where the child starts)."""
    dec = json.JSONDecoder()
    close = "]" if text[i] == "[" else "}"
    at, line = i, _line(text, i)          # lines counted incrementally: SSv2's train JSON has 169k entries
    i += 1
    while True:
        i = _skip(text, i)
        if text[i] == close:
            return
        line, at, key = line + text.count("\n", at, i), i, None
        if close == "}":
            key, end = dec.raw_decode(text, i)
            i = _skip(text, _skip(text, end) + 1)     # past ":"
        value, end = dec.raw_decode(text, i)
        yield line, key, i, value
        i = _skip(text, end)
        if text[i] == ",":
            i += 1


def json_items(path: str, key: Optional[str] = None) -> List[Tuple[int, object]]:
    """``(line, item)`` of a top-level JSON array, or of the array under ``key`` of a
    top-level object; the line is where the item starts (for ``FILE:LINE`` messages)."""
    text = _load_json_text(path)
    i = _skip(text, 0)
    if key is None:
        if text[i] != "[":
            raise ListFileError(f"{path}:{_line(text, i)}: expected a JSON list of entries")
        return [(line, v) for line, _, _, v in _json_children(text, i)]
    if text[i] != "{":
        raise ListFileError(f"{path}:{_line(text, i)}: expected a JSON object with a {key!r} list")
    for _, k, j, _ in _json_children(text, i):
        if k == key:
            if text[j] != "[":
                raise ListFileError(f"{path}:{_line(text, j)}: {key!r} must be a list")
            return [(line, v) for line, _, _, v in _json_children(text, j)]
    raise ListFileError(f"{path}: the JSON object has no {key!r} list")


def _lines(path: str) -> List[Tuple[int, str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        return [(n, ln.strip()) for n, ln in enumerate(f.read().splitlines(), start=1)
                if ln.strip() and not ln.lstrip().startswith("#")]


def _csv_rows(path: str, needed: Sequence[str]) -> Tuple[List[str], List[Tuple[int, Dict[str, str]]], List[str]]:
    """Header, ``(line, row)`` pairs and problems of a CSV file whose header must hold ``needed``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path!r} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    start = next((i for i, r in enumerate(rows) if any(c.strip() for c in r)), None)
    if start is None:
        raise ListFileError(f"{path}: empty CSV file")
    header = [c.strip().lower() for c in rows[start]]
    lacking = [c for c in needed if c not in header]
    if lacking:
        raise ListFileError(f"{path}:{start + 1}: CSV header {header} lacks column(s) {lacking}")
    out, problems = [], []
    for n, r in enumerate(rows[start + 1:], start=start + 2):
        if not any(c.strip() for c in r):
            continue
        if len(r) != len(header):
            problems.append(f"{path}:{n}: expected {len(header)} fields like the header, got {len(r)}")
            continue
        out.append((n, {h: c.strip() for h, c in zip(header, r)}))
    return header, out, problems


def _fixed_classes(class_names: Optional[str]) -> Optional[Dict[str, int]]:
    return None if class_names is None else {n: i for i, n in enumerate(read_class_names(class_names))}


# ----------------------------------------------------------------- the readers
def read_ssv2(annotations: str, labels: str) -> Annotations:
    """Something-Something v2: ``something-something-v2-<split>.json`` and ``labels.json``."""
    text = _load_json_text(labels)
    i = _skip(text, 0)
    if text[i] != "{":
        raise ListFileError(f"{labels}:{_line(text, i)}: expected a JSON object 'template name': 'index'")
    index: Dict[str, int] = {}
    for line, name, _, value in _json_children(text, i):
        try:
            index[name] = int(value)
        except (TypeError, ValueError):
            raise ListFileError(f"{labels}:{line}: class index {value!r} of {name!r} is not an integer") from None
    if sorted(index.values()) != list(range(len(index))):
        raise ListFileError(f"{labels}: class indices must be 0..{len(index) - 1} without gaps or repeats")
    names = [""] * len(index)
    for name, k in index.items():
        names[k] = name
    entries, problems = [], []
    for line, item in json_items(annotations):
        where = f"{annotations}:{line}"
        if not isinstance(item, dict) or "id" not in item:
            problems.append(f"{where}: entry has no 'id'")
            continue
        if "template" not in item:
            problems.append(f"{where}: entry {item['id']!r} has no 'template' (a test-set entry has no label)")
            continue
        name = str(item["template"]).replace("[", "").replace("]", "")
        if name not in index:
            problems.append(f"{where}: template {name!r} is not a class of {labels}")
            continue
        vid = str(item["id"]).strip()
        entries.append(Entry(where, [f"{vid}.webm"], index[name]))
    return Annotations(entries, names, problems)


def _number(value: str) -> Optional[float]:
    try:
        return float(value)
    except ValueError:
        return None


def read_kinetics(path: str, class_names: Optional[str] = None) -> Annotations:
    """Kinetics-400/600/700 CSV (``label,youtube_id,time_start,time_end,split`` in any order).

    The video of a row is looked for as the trimmed clip ``<id>_<start:06d>_<end:06d>``
    (in the label's folder or anywhere) first, then as the untrimmed ``<id>`` video, which
    is then trimmed to ``[time_start, time_end)``. Classes are the labels sorted by name,
    or the given class-name file's (use the training split's for validation).
    """
    _, rows, problems = _csv_rows(path, ("youtube_id", "time_start", "time_end", "label"))
    fixed = _fixed_classes(class_names)
    good = []
    for n, r in rows:
        where = f"{path}:{n}"
        t0, t1 = _number(r["time_start"]), _number(r["time_end"])
        if not r["youtube_id"]:
            problems.append(f"{where}: empty youtube_id")
        elif t0 is None or t1 is None:
            problems.append(f"{where}: time_start {r['time_start']!r} / time_end {r['time_end']!r} are not numbers")
        elif not 0 <= t0 < t1:
            problems.append(f"{where}: time_end {t1:g} is not after time_start {t0:g}")
        elif not r["label"]:
            problems.append(f"{where}: empty label")
        elif fixed is not None and r["label"] not in fixed:
            problems.append(f"{where}: label {r['label']!r} is not in {class_names}")
        else:
            good.append((where, r, t0, t1))
    names = sorted(fixed, key=fixed.get) if fixed is not None else sorted({r["label"] for _, r, _, _ in good})
    index = {c: i for i, c in enumerate(names)}
    entries = []
    for where, r, t0, t1 in good:
        yid, label = r["youtube_id"], r["label"]
        clip = f"{yid}_{int(t0):06d}_{int(t1):06d}"
        cands = [f"{label}/{clip}.mp4", f"{label.replace(' ', '_')}/{clip}", clip]
        entries.append(Entry(where, cands, index[label], untrimmed=[yid], start=t0, end=t1))
    return Annotations(entries, names, problems)


def read_ucf101(split_file: str, class_index: str) -> Annotations:
    """UCF-101: ``trainlistNN.txt`` (``Class/v_....avi LABEL``, 1-based) or ``testlistNN.txt``
    (paths only; the label comes from the class folder) and ``classInd.txt``."""
    classes: Dict[int, str] = {}
    for n, ln in _lines(class_index):
        parts = ln.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise ListFileError(f"{class_index}:{n}: expected 'INDEX ClassName', got {ln!r}")
        classes[int(parts[0])] = parts[1]
    if sorted(classes) != list(range(1, len(classes) + 1)):
        raise ListFileError(f"{class_index}: class indices must be 1..{len(classes)} without gaps")
    names = [classes[i] for i in range(1, len(classes) + 1)]
    by_name = {c: i for i, c in enumerate(names)}
    entries, problems = [], []
    for n, ln in _lines(split_file):
        where = f"{split_file}:{n}"
        parts = ln.split()
        if len(parts) not in (1, 2):
            problems.append(f"{where}: expected 'Class/video.avi [LABEL]', got {ln!r}")
            continue
        rel = parts[0]
        folder = rel.split("/")[0] if "/" in rel else None
        if folder not in by_name:
            problems.append(f"{where}: class folder {folder!r} of {rel!r} is not in {class_index}")
            continue
        label = by_name[folder]
        if len(parts) == 2:
            if not parts[1].isdigit() or int(parts[1]) - 1 != label:
                problems.append(f"{where}: label {parts[1]!r} does not match class {folder!r} "
                                f"(index {label + 1} in {class_index})")
                continue
        entries.append(Entry(where, [rel], label))
    return Annotations(entries, names, problems)


def read_hmdb51(split_dir: str, split: int = 1, subset: str = "train") -> Annotations:
    """HMDB-51: the ``<class>_test_split<N>.txt`` files (``video.avi 0|1|2``: unused, train,
    test) of split ``split``; classes are the class names sorted."""
    if subset not in ("train", "test"):
        raise ValueError(f"HMDB-51 subset must be 'train' or 'test', got {subset!r}")
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"HMDB-51 split folder {split_dir!r} does not exist")
    suffix = f"_test_split{int(split)}.txt"
    files = sorted(f for f in os.listdir(split_dir) if f.endswith(suffix))
    if not files:
        raise ListFileError(f"{split_dir}: no '*{suffix}' files (split {split})")
    names = [f[:-len(suffix)] for f in files]
    want = "1" if subset == "train" else "2"
    entries, problems = [], []
    for label, (cls, fname) in enumerate(zip(names, files)):
        path = os.path.join(split_dir, fname)
        for n, ln in _lines(path):
            parts = ln.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                problems.append(f"{path}:{n}: expected 'video.avi 0|1|2', got {ln!r}")
                continue
            if parts[1] == want:
                entries.append(Entry(f"{path}:{n}", [f"{cls}/{parts[0]}"], label))
    return Annotations(entries, names, problems)


def read_msrvtt(captions: str, split_csv: Optional[str] = None, subset: Optional[str] = None) -> Annotations:
    """MSR-VTT captions as ``(video, caption)`` entries.

    With ``split_csv`` holding a ``sentence`` column (``MSRVTT_JSFUSION_test.csv``, the 1k-A
    test) the pairs are its rows; with only ``video_id`` (``MSRVTT_train.9k.csv``) every
    caption of those videos in ``captions`` (``MSRVTT_data.json``). Without a CSV, the
    official split ``subset`` (``train``, ``validate``, ``test``) of the JSON's ``videos``.
    """
    entries, problems = [], []
    if split_csv is not None:
        header, rows, problems = _csv_rows(split_csv, ("video_id",))
        if "sentence" in header:
            for n, r in rows:
                if not r["video_id"] or not r["sentence"]:
                    problems.append(f"{split_csv}:{n}: empty video_id or sentence")
                    continue
                entries.append(Entry(f"{split_csv}:{n}", [f"{r['video_id']}.mp4"], caption=r["sentence"]))
            return Annotations(entries, None, problems)
        wanted = {r["video_id"]: f"{split_csv}:{n}" for n, r in rows if r["video_id"]}
    else:
        if subset not in ("train", "validate", "test"):
            raise ValueError(f"MSR-VTT without a split CSV needs subset train, validate or test, got {subset!r}")
        wanted = {}
        for line, v in json_items(captions, "videos"):
            if not isinstance(v, dict) or "video_id" not in v or "split" not in v:
                problems.append(f"{captions}:{line}: video entry needs 'video_id' and 'split'")
            elif v["split"] == subset:
                wanted[str(v["video_id"])] = f"{captions}:{line}"
    seen = set()
    for line, s in json_items(captions, "sentences"):
        where = f"{captions}:{line}"
        if not isinstance(s, dict) or "video_id" not in s or not str(s.get("caption", "")).strip():
            problems.append(f"{where}: sentence entry needs 'video_id' and a non-empty 'caption'")
            continue
        vid = str(s["video_id"])
        if vid in wanted:
            seen.add(vid)
            entries.append(Entry(where, [f"{vid}.mp4"], caption=" ".join(str(s["caption"]).split())))
    for vid in sorted(set(wanted) - seen):
        problems.append(f"{wanted[vid]}: video {vid!r} has no caption in {captions}")
    return Annotations(entries, None, problems)


def read_mmaction(path: str, class_names: Optional[str] = None) -> Annotations:
    """An mmaction2 annotation list: ``path label`` (VideoDataset) or ``frame_dir total_frames
    label`` (RawframeDataset); labels are integer class ids."""
    fixed = _fixed_classes(class_names)
    entries, problems = [], []
    for n, ln in _lines(path):
        where = f"{path}:{n}"
        parts = ln.split()
        if len(parts) == 3 and parts[1].isdigit():
            parts = [parts[0], parts[2]]
        if len(parts) != 2:
            problems.append(f"{where}: expected 'path label' or 'frame_dir total_frames label' (one label), "
                            f"got {len(parts)} fields")
            continue
        if not parts[1].isdigit():
            problems.append(f"{where}: label {parts[1]!r} is not a non-negative integer")
            continue
        label = int(parts[1])
        if fixed is not None and label >= len(fixed):
            problems.append(f"{where}: label {label} is outside [0, {len(fixed)}) of {class_names}")
            continue
        entries.append(Entry(where, [parts[0]], label))
    names = sorted(fixed, key=fixed.get) if fixed is not None else None
    return Annotations(entries, names, problems)


# ----------------------------------------------------------------- finding the videos
class VideoIndex:
    """Every video file and frame folder under ``root``, found in one walk, by relative
    path, relative path without extension, and file stem."""

    def __init__(self, root: str, frame_template: str = DEFAULT_FRAME_TEMPLATE, frame_start_index: int = 1):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"video root {root!r} does not exist")
        self.root = root
        self.by_rel: Dict[str, str] = {}
        self.by_stem: Dict[str, List[str]] = {}
        first = frame_template.format(frame_start_index)
        for d, dirs, files in os.walk(root):
            rel_d = os.path.relpath(d, root).replace(os.sep, "/")
            if rel_d != "." and first in files:      # a frame folder: one video, do not list its images
                self._add(rel_d, rel_d)
                dirs[:] = []
                continue
            for f in files:
                stem, ext = os.path.splitext(f)
                if ext.lower() in VIDEO_EXTENSIONS:
                    rel = f if rel_d == "." else f"{rel_d}/{f}"
                    self._add(rel, rel[:-len(ext)])

    def _add(self, rel: str, no_ext: str):
        self.by_rel[rel] = rel
        self.by_rel.setdefault(no_ext, rel)
        self.by_stem.setdefault(no_ext.rsplit("/", 1)[-1], []).append(rel)

    def find(self, candidate: str) -> Optional[str]:
        """The stored relative path for ``candidate`` (a path with or without extension, or
        a bare stem that names exactly one video), else ``None``."""
        c = candidate.replace(os.sep, "/").strip("/")
        if c in self.by_rel:
            return self.by_rel[c]
        stem, ext = os.path.splitext(c)
        if ext.lower() in VIDEO_EXTENSIONS and stem in self.by_rel:
            return self.by_rel[stem]
        if "/" not in c:
            hits = self.by_stem.get(stem if ext.lower() in VIDEO_EXTENSIONS else c, [])
            if len(hits) == 1:
                return hits[0]
        return None

    def __len__(self) -> int:
        return len(set(self.by_rel.values()))


def locate_videos(ann: Annotations, index: Optional[VideoIndex]) -> Tuple[List[Entry], List[Entry]]:
    """``(entries with the path found as their only candidate, entries not found)``.

    Without an index nothing is checked and each entry keeps its dataset-default path.
    """
    if index is None:
        return [replace(e, candidates=[e.candidates[0]], start=None, end=None) for e in ann.entries], []
    found, missing = [], []
    for e in ann.entries:
        hit = next((p for p in (index.find(c) for c in e.candidates) if p), None)
        if hit is not None:
            found.append(replace(e, candidates=[hit], start=None, end=None))
            continue
        hit = next((p for p in (index.find(c) for c in e.untrimmed) if p), None)
        if hit is not None:
            found.append(replace(e, candidates=[hit]))
        else:
            missing.append(e)
    return found, missing


# ----------------------------------------------------------------- the prepare-data step
@dataclass
class Prepared:
    """What :func:`prepare` wrote and found."""

    list_file: str
    class_file: Optional[str]
    count: int
    problems: List[str]
    missing: List[str]
    missing_file: Optional[str]
    summary: List[str]


def read_annotations(fmt: str, inputs: Sequence[str], *, class_names: Optional[str] = None, split: int = 1,
                     subset: Optional[str] = None) -> Annotations:
    """Dispatch to the reader of ``fmt`` (one of :data:`FORMATS`) with its input files."""
    want = {"ssv2": (2, 2), "kinetics": (1, 1), "ucf101": (2, 2), "hmdb51": (1, 1), "msrvtt": (1, 2),
            "mmaction": (1, 1)}
    usage = {"ssv2": "ANNOTATIONS.json LABELS.json", "kinetics": "KINETICS.csv", "ucf101": "SPLIT.txt classInd.txt",
             "hmdb51": "SPLIT_FOLDER", "msrvtt": "CAPTIONS.json [SPLIT.csv]", "mmaction": "LIST.txt"}
    if fmt not in FORMATS:
        raise ValueError(f"unknown annotation format {fmt!r}; expected one of {FORMATS}")
    lo, hi = want[fmt]
    if not lo <= len(inputs) <= hi:
        raise ValueError(f"{fmt} takes {usage[fmt]}, got {len(inputs)} file(s): {list(inputs)}")
    if fmt == "ssv2":
        return read_ssv2(inputs[0], inputs[1])
    if fmt == "kinetics":
        return read_kinetics(inputs[0], class_names)
    if fmt == "ucf101":
        return read_ucf101(inputs[0], inputs[1])
    if fmt == "hmdb51":
        return read_hmdb51(inputs[0], split, subset or "train")
    if fmt == "msrvtt":
        return read_msrvtt(inputs[0], inputs[1] if len(inputs) > 1 else None, subset)
    return read_mmaction(inputs[0], class_names)


def prepare(fmt: str, inputs: Sequence[str], output: str, *, root: Optional[str] = None,
            class_names: Optional[str] = None, classes_out: Optional[str] = None, split: int = 1,
            subset: Optional[str] = None, keep_missing: bool = False, allow_malformed: bool = False,
            frame_template: str = DEFAULT_FRAME_TEMPLATE, frame_start_index: int = 1) -> Prepared:
    """Read a dataset's annotations and write vpeft's list file (and class-name file).

    Classification formats write ``path label`` lines (a ``path,label,start,end`` CSV when
    clips are trimmed windows of untrimmed videos) and the class names, one per line, to
    ``classes_out`` (default ``classes.txt`` next to ``output``); MSR-VTT writes
    ``video<TAB>caption`` lines. With ``root`` every video is looked for under it; missing
    ones are left out (kept with ``keep_missing``) and their names written to
    ``<output>.missing.txt``. A malformed entry raises :class:`ListFileError` listing every
    one as ``FILE:LINE: what is wrong`` (nothing is written); with ``allow_malformed``
    they are left out and returned in ``problems``.
    """
    ann = read_annotations(fmt, inputs, class_names=class_names, split=split, subset=subset)
    if ann.problems and not allow_malformed:
        shown = "\n".join(ann.problems[:50])
        more = f"\n... and {len(ann.problems) - 50} more" if len(ann.problems) > 50 else ""
        raise ListFileError(f"{len(ann.problems)} malformed entries (nothing written; --allow-malformed leaves "
                            f"them out):\n{shown}{more}")
    index = VideoIndex(root, frame_template, frame_start_index) if root else None
    found, missing = locate_videos(ann, index)
    if keep_missing:
        found += [replace(e, candidates=[e.candidates[0]], start=None, end=None) for e in missing]
    missing = list(dict.fromkeys(e.candidates[0] for e in missing))      # unique (MSR-VTT: many captions a video)
    videos = len({e.candidates[0] for e in ann.entries})
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    summary = [f"{fmt}: {len(ann.entries) + len(ann.problems)} entries read from {', '.join(inputs)}"]
    if ann.problems:
        summary.append(f"{len(ann.problems)} malformed entries left out (listed above)")
    if fmt == "msrvtt":
        tmp = output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(f"{e.candidates[0]}\t{e.caption}\n" for e in found)
        os.replace(tmp, output)
        class_file = None
    else:
        write_list(output, [Sample(e.candidates[0], e.label, e.start, e.end) for e in found])
        class_file = None
        if ann.class_names is not None:
            class_file = classes_out or os.path.join(os.path.dirname(os.path.abspath(output)), "classes.txt")
            with open(class_file + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(f"{c}\n" for c in ann.class_names)
            os.replace(class_file + ".tmp", class_file)
    missing_file = None
    if missing:
        missing_file = output + ".missing.txt"
        with open(missing_file, "w", encoding="utf-8") as f:
            f.writelines(f"{m}\n" for m in missing)
        summary.append(f"{len(missing)} of {videos} videos are missing under {root} "
                       f"({'kept in' if keep_missing else 'left out of'} the list; names in {missing_file})")
    trimmed = sum(1 for e in found if e.start is not None or e.end is not None)
    summary.append(f"wrote {len(found)} {'pairs' if fmt == 'msrvtt' else 'samples'} to {output}"
                   + (f" ({trimmed} trimmed from untrimmed videos)" if trimmed else "")
                   + (f" and {len(ann.class_names)} class names to {class_file}" if class_file else ""))
    return Prepared(output, class_file, len(found), ann.problems, missing, missing_file, summary)


def add_prepare_data_parser(sub) -> None:
    """The ``vpeft prepare-data`` subcommand (added to the CLI's subparsers)."""
    p = sub.add_parser("prepare-data", help="turn a dataset's own annotation files into a vpeft list file "
                       "and class-name file",
                       description="FORMAT and its inputs: ssv2 ANNOTATIONS.json LABELS.json | kinetics CSV | "
                       "ucf101 SPLIT.txt classInd.txt | hmdb51 SPLIT_FOLDER (--split, --subset) | "
                       "msrvtt CAPTIONS.json [SPLIT.csv] (without a CSV: --subset train|validate|test) | "
                       "mmaction LIST.txt")
    p.add_argument("format", choices=FORMATS)
    p.add_argument("inputs", nargs="+", metavar="FILE", help="the dataset's annotation files (see above)")
    p.add_argument("-o", "--output", required=True, help="the list file to write")
    p.add_argument("--root", help="video directory: check every video exists there and find its real name "
                   "(any extension, a frame folder, a trimmed or untrimmed Kinetics clip)")
    p.add_argument("--class-names", metavar="FILE", help="fixed class names (e.g. the training split's "
                   "classes.txt when preparing validation) for kinetics and mmaction")
    p.add_argument("--classes-out", metavar="FILE", help="class-name file to write (default: classes.txt next "
                   "to the list)")
    p.add_argument("--split", type=int, default=1, help="HMDB-51 split number (1-3)")
    p.add_argument("--subset", help="HMDB-51: train or test; MSR-VTT without a split CSV: train, validate, test")
    p.add_argument("--keep-missing", action="store_true", help="keep entries whose video is not under --root")
    p.add_argument("--allow-malformed", action="store_true", help="leave malformed entries out instead of failing")
    p.add_argument("--frame-template", default=DEFAULT_FRAME_TEMPLATE, help="frame-folder image names")
    p.set_defaults(func=cmd_prepare_data)


def cmd_prepare_data(args) -> int:
    """Run ``vpeft prepare-data``: problems and the summary go to stderr, one line each."""
    import sys

    out = prepare(args.format, args.inputs, args.output, root=args.root, class_names=args.class_names,
                  classes_out=args.classes_out, split=args.split, subset=args.subset,
                  keep_missing=args.keep_missing, allow_malformed=args.allow_malformed,
                  frame_template=args.frame_template)
    for line in out.problems + out.summary:
        print(line, file=sys.stderr)
    return 0
