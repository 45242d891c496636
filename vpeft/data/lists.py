"""List files and class-name files in the formats video datasets are shipped in.

Two list formats are read:

* plain text, one clip per line: ``relative/path.mp4 LABEL`` (whitespace separated;
  the path may contain spaces when the label is the last field; blank lines and lines
  starting with ``#`` are skipped). This is the Kinetics / SSv2 ``train.txt`` layout
  used by mmaction and VideoMAE.
* CSV with a header row: a path column (``path``, ``video``, ``filename`` or
  ``video_id``) and a label column (``label``, ``label_id``, ``class`` or ``target``),
  and optionally ``start`` / ``end`` columns (or ``time_start`` / ``time_end``): the
  clip is that window, in seconds, of the video (an empty cell means "from the
  beginning" / "to the end"). This is how untrimmed Kinetics videos are listed.

A path may name a frame folder (a directory of ``img_00001.jpg`` ...) instead of a file.

Labels are integers in ``[0, num_classes)``, or class names when a class-name list is
given. Every error names the file and the 1-based line number.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

PATH_COLUMNS = ("path", "video", "filename", "video_id")
LABEL_COLUMNS = ("label", "label_id", "class", "target")
START_COLUMNS = ("start", "time_start")
END_COLUMNS = ("end", "time_end")


class ListFileError(ValueError):
    """A list or class-name file that cannot be parsed; the message names file and line."""


@dataclass(frozen=True)
class Sample:
    """One entry of a list file: the video's path relative to the root, its label, and
    optionally the ``[start, end)`` window in seconds the clip is taken from."""

    path: str
    label: int
    start: Optional[float] = None
    end: Optional[float] = None


def read_class_names(path: str) -> List[str]:
    """Class names, one per line, in label order (line ``i`` is class ``i``).

    A CSV with a header ``id,name`` (any order) is also accepted.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class-name file {path!r} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        lines = f.read().splitlines()
    if lines and "," in lines[0] and {"id", "name"} <= {c.strip().lower() for c in lines[0].split(",")}:
        reader = csv.DictReader(lines)
        rows = {}
        for lineno, row in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            try:
                idx = int(row["id"])
            except ValueError:
                raise ListFileError(f"{path}:{lineno}: class id {row['id']!r} is not an integer") from None
            if idx in rows:
                raise ListFileError(f"{path}:{lineno}: class id {idx} appears twice")
            rows[idx] = row["name"]
        if sorted(rows) != list(range(len(rows))):
            raise ListFileError(f"{path}: class ids must be 0..{len(rows) - 1} without gaps, got {sorted(rows)}")
        return [rows[i] for i in range(len(rows))]
    names = [ln.strip() for ln in lines if ln.strip()]
    if not names:
        raise ListFileError(f"class-name file {path!r} is empty")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ListFileError(f"class-name file {path!r} repeats names {dup[:5]}")
    return names


def _label(value: str, where: str, class_names: Optional[Dict[str, int]], num_classes: Optional[int]) -> int:
    value = value.strip()
    try:
        label = int(value)
    except ValueError:
        if class_names is not None and value in class_names:
            return class_names[value]
        hint = "an integer class id" + (" or a class name from the class-name file" if class_names else "")
        raise ListFileError(f"{where}: label {value!r} is not {hint}") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise ListFileError(f"{where}: label {label} is outside [0, {num_classes})" if num_classes
                            else f"{where}: label {label} is negative")
    return label


def read_list(path: str, *, num_classes: Optional[int] = None,
              class_names: Optional[Sequence[str]] = None) -> List[Sample]:
    """Parse a list file (plain ``path label`` lines, or CSV with a header).

    Args:
        path: the list file. A ``.csv`` suffix, or a first line containing a comma and
            a known column name, selects CSV.
        num_classes: when given, labels must be in ``[0, num_classes)``.
        class_names: when given, labels may also be written as class names.

    Raises:
        FileNotFoundError: the file does not exist.
        ListFileError: a malformed line (the message is ``FILE:LINE: what is wrong``),
            or a file with no samples.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"list file {path!r} does not exist")
    names = {n: i for i, n in enumerate(class_names)} if class_names is not None else None
    if names is not None and num_classes is None:
        num_classes = len(names)
    with open(path, newline="", encoding="utf-8") as f:
        lines = f.read().splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    header = [c.strip().lower() for c in first.split(",")]
    is_csv = path.lower().endswith(".csv") or ("," in first and any(c in PATH_COLUMNS for c in header))
    samples = _read_csv(path, lines, names, num_classes) if is_csv else _read_plain(path, lines, names, num_classes)
    if not samples:
        raise ListFileError(f"list file {path!r} has no samples")
    return samples


def _read_plain(path, lines, names, num_classes) -> List[Sample]:
    out = []
    for lineno, line in enumerate(lines, start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.rsplit(None, 1)
        if len(parts) != 2:
            raise ListFileError(f"{path}:{lineno}: expected 'relative/path.mp4 LABEL', got {s!r}")
        out.append(Sample(parts[0], _label(parts[1], f"{path}:{lineno}", names, num_classes)))
    return out


def _read_csv(path, lines, names, num_classes) -> List[Sample]:
    start = next(i for i, ln in enumerate(lines) if ln.strip())
    reader = csv.reader(lines[start:])
    header = [c.strip().lower() for c in next(reader)]
    pcol = next((header.index(c) for c in PATH_COLUMNS if c in header), None)
    lcol = next((header.index(c) for c in LABEL_COLUMNS if c in header), None)
    if pcol is None or lcol is None:
        raise ListFileError(f"{path}:{start + 1}: CSV header {header} needs a path column (one of {PATH_COLUMNS}) "
                            f"and a label column (one of {LABEL_COLUMNS})")
    scol = next((header.index(c) for c in START_COLUMNS if c in header), None)
    ecol = next((header.index(c) for c in END_COLUMNS if c in header), None)
    out = []
    for off, row in enumerate(reader, start=start + 2):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise ListFileError(f"{path}:{off}: expected {len(header)} fields like the header, got {len(row)}: {row}")
        p = row[pcol].strip()
        if not p:
            raise ListFileError(f"{path}:{off}: empty video path")
        where = f"{path}:{off}"
        t0 = _seconds(row[scol], where, "start") if scol is not None else None
        t1 = _seconds(row[ecol], where, "end") if ecol is not None else None
        if t0 is not None and t1 is not None and t1 <= t0:
            raise ListFileError(f"{where}: end {t1} is not after start {t0}")
        out.append(Sample(p, _label(row[lcol], where, names, num_classes), t0, t1))
    return out


def _seconds(value: str, where: str, what: str) -> Optional[float]:
    value = value.strip()
    if not value:
        return None
    try:
        t = float(value)
    except ValueError:
        raise ListFileError(f"{where}: {what} time {value!r} is not a number of seconds") from None
    if not t >= 0:
        raise ListFileError(f"{where}: {what} time {t} is negative")
    return t


def write_list(path: str, samples: Sequence[Sample]) -> None:
    """Write ``samples`` so that :func:`read_list` reads them back: ``path label`` lines, or
    a ``path,label,start,end`` CSV when any sample is trimmed (or a path has a comma or
    starts with ``#``, which the plain format cannot hold)."""
    trimmed = any(s.start is not None or s.end is not None for s in samples)
    plain_ok = not trimmed and all("," not in s.path and not s.path.startswith("#") and s.path == s.path.strip()
                                   and "\n" not in s.path for s in samples)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        if plain_ok:
            f.writelines(f"{s.path} {s.label}\n" for s in samples)
        else:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["path", "label", "start", "end"])
            w.writerows([s.path, s.label, "" if s.start is None else f"{s.start:g}", "" if s.end is None else f"{s.end:g}"]
                        for s in samples)
    os.replace(tmp, path)
