"""Data sources and their DALI readers: ImageNet class folders, `path label` file lists and
WebDataset tar shards.

`resolve_source` turns what the user passed into a `Source` (errors for missing or empty data
come here, before any pipeline is built); `read` inserts the matching DALI reader into a
pipeline. Class index = sorted class-folder names, as torchvision's `ImageFolder`.

Sharding (data parallel): DALI's shard `s` of `S` holds samples [floor(s*N/S), floor((s+1)*N/S))
of the epoch order. With `pad_last_batch=True` every shard reads the same number of batches per
epoch, ceil(ceil(N/S) / B), the tail of its last batch filled with copies of its last sample;
`epoch_runs` and `shard_size` give the loaders what they need to drop those copies.
Training shuffles with `shuffle_after_epoch` (one seeded permutation of the whole data set per
epoch, the same on every shard, so the shards partition each epoch); validation reads in order.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""Files counted as images in class folders (torchvision's IMG_EXTENSIONS, any case)."""
WDS_IMAGE_EXT = "jpg;jpeg;png"
WDS_LABEL_EXT = "cls"
READER_NAME = "reader"

__all__ = [
    "IMAGE_EXTENSIONS", "Source", "resolve_source", "list_class_folders", "read_file_list",
    "read_exclude", "read", "epoch_runs", "shard_size",
]


@dataclass(frozen=True)
class Source:
    """A resolved data source.

    kind: "folder" | "list" | "webdataset".  root: what the user passed (for messages).
    files / labels: absolute image paths and their class indices (folder, list).
    classes: class-folder names in index order (folder only).  tars: shard paths (webdataset).
    """

    kind: str
    root: str
    files: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()
    classes: tuple[str, ...] = ()
    tars: tuple[str, ...] = ()
    excluded: int = field(default=0)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_class_folders(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, classes) of an ImageNet-layout tree: root/<class>/**/<image>.

    Classes are the sorted sub-folder names (torchvision ImageFolder order); files are sorted
    within each class. Raises FileNotFoundError / ValueError for a missing root, a root without
    class folders, or a class folder without images."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder {root!r} does not exist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(
            f"no class folders in {root!r}: expected the ImageNet layout root/<class>/<image>.jpg "
            "(or pass a file list or WebDataset .tar shards)"
        )
    files: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for index, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
            dirnames.sort()
            found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
        if not found:
            empty.append(name)
        files += found
        labels += [index] * len(found)
    if empty:
        shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise ValueError(
            f"{len(empty)} class folder(s) in {root!r} contain no images "
            f"({', '.join(IMAGE_EXTENSIONS)}): {shown}; remove them or add images "
            "(class indices are the sorted folder names, so an empty class still shifts them)"
        )
    return files, labels, classes


def read_file_list(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """(files, labels) from a text file with one `path label` per line.

    Relative paths are taken relative to the list's folder; a path may contain spaces (the
    label is the last field). Blank lines and lines starting with '#' are skipped."""
    path = os.path.abspath(path)
    base = os.path.dirname(path)
    files: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            try:
                if len(parts) != 2:
                    raise ValueError
                label = int(parts[1])
                if label < 0:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"{path}:{lineno}: expected 'path label' with a non-negative integer label, "
                    f"got {line!r}"
                ) from None
            files.append(os.path.normpath(os.path.join(base, parts[0])))
            labels.append(label)
    if not files:
        raise ValueError(f"file list {path!r} has no entries (expected 'path label' per line)")
    return files, labels


def read_exclude(exclude: str | os.PathLike | Iterable[str] | None) -> set[str]:
    """Absolute paths to leave out: a file written by `python -m pipelines.scan` (one path per
    line, optionally followed by a tab and a reason) or an iterable of paths."""
    if exclude is None:
        return set()
    if isinstance(exclude, (str, os.PathLike)):
        if not os.path.isfile(exclude):
            raise FileNotFoundError(
                f"exclude list {str(exclude)!r} does not exist (write one with "
                "`python -m pipelines.scan ROOT --output bad.txt`)"
            )
        with open(exclude, encoding="utf-8") as f:
            entries = [ln.split("\t", 1)[0].strip() for ln in f]
        entries = [e for e in entries if e and not e.startswith("#")]
    else:
        entries = [str(e) for e in exclude]
    return {os.path.abspath(e) for e in entries}


def _tar_paths(source: str) -> list[str] | None:
    """Tar shards named by `source` (a directory of .tar files, a .tar file, a glob or a
    brace pattern like shard-{000..127}.tar), or None when `source` is not a tar source."""
    if any(c in source for c in "*?[{"):
        paths: list[str] = []
        for pattern in _expand_braces(source):
            paths += glob.glob(pattern) if any(c in pattern for c in "*?[") else [pattern]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"WebDataset shard(s) not found: {', '.join(missing[:5])}")
        if not paths:
            raise FileNotFoundError(f"no WebDataset shards match {source!r}")
        return sorted(os.path.abspath(p) for p in paths)
    if os.path.isfile(source) and source.endswith(".tar"):
        return [os.path.abspath(source)]
    if os.path.isdir(source):
        tars = sorted(e.path for e in os.scandir(source) if e.is_file() and e.name.endswith(".tar"))
        has_dirs = any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(source))
        if tars and not has_dirs:
            return [os.path.abspath(t) for t in tars]
    return None


def _expand_braces(pattern: str) -> list[str]:
    """shard-{000..002}.tar -> shard-000.tar, shard-001.tar, shard-002.tar; {a,b} lists too."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    end = pattern.find("}", start)
    if end < 0:
        raise ValueError(f"unbalanced brace in {pattern!r}")
    body, head, tail = pattern[start + 1:end], pattern[:start], pattern[end + 1:]
    if ".." in body:
        lo, hi = body.split("..", 1)
        if not (lo.isdigit() and hi.isdigit()):
            raise ValueError(f"brace range must be numeric like {{000..127}}, got {{{body}}}")
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in _expand_braces(head + item + tail)]


def resolve_source(source: str | os.PathLike | Sequence[str], *,
                   exclude: str | os.PathLike | Iterable[str] | None = None) -> Source:
    """A `Source` from a class-folder root, a file list, or WebDataset shards (a directory of
    .tar files, one .tar, a glob or brace pattern, or a list of .tar paths).

    exclude: files to leave out (see `read_exclude`); folder and list sources only."""
    if isinstance(source, (list, tuple)):
        tars = [os.path.abspath(str(t)) for t in source]
        bad = [t for t in tars if not (t.endswith(".tar") and os.path.isfile(t))]
        if bad or not tars:
            raise FileNotFoundError(f"WebDataset shard(s) not found or not .tar: {bad[:5] or tars}")
        kind, root = "webdataset", str(source[0]) if source else ""
    else:
        root = os.fspath(source)
        if not any(c in root for c in "*?[{") and not os.path.exists(root):
            raise FileNotFoundError(f"data source {root!r} does not exist")
        tars = _tar_paths(root)
        kind = "webdataset" if tars is not None else ("folder" if os.path.isdir(root) else "list")
    if kind == "webdataset":
        if exclude is not None:
            raise ValueError(
                "exclude= works for class folders and file lists only; for WebDataset shards "
                "rewrite the shards without the files `python -m pipelines.scan` lists"
            )
        return Source(kind=kind, root=root, tars=tuple(tars))
    if kind == "folder":
        files, labels, classes = list_class_folders(root)
    else:
        files, labels = read_file_list(root)
        classes = []
    drop = read_exclude(exclude)
    n = len(files)
    if drop:
        keep = [i for i, f in enumerate(files) if f not in drop]
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        if not files:
            raise ValueError(f"exclude= removed every file of {root!r}")
    return Source(kind=kind, root=root, files=tuple(files), labels=tuple(labels),
                  classes=tuple(classes), excluded=n - len(files))


def read(source: Source, *, shard_id: int, num_shards: int, shuffle: bool, seed: int,
         initial_fill: int = 1024):
    """Insert the reader for `source` into the current pipeline: (encoded, label) DataNodes,
    label int32 of shape (1,). Named READER_NAME (for reader_meta and checkpoints).

    shuffle=True: a new permutation of the whole data set each epoch, seeded by `seed` (the
    same on every shard); WebDataset permutes the shard order and shuffles samples inside a
    buffer of `initial_fill`. shuffle=False: file order, each shard sticks to its slice."""
    from nvidia.dali import fn, types

    common = dict(shard_id=shard_id, num_shards=num_shards, pad_last_batch=True, name=READER_NAME)
    if shuffle:
        common.update(shuffle_after_epoch=True, shuffle_after_epoch_seed=seed)
    else:
        common.update(stick_to_shard=True)
    if source.kind == "webdataset":
        if shuffle:
            common.update(random_shuffle=True, initial_fill=initial_fill, seed=seed)
        encoded, cls = fn.readers.webdataset(
            paths=list(source.tars), ext=[WDS_IMAGE_EXT, WDS_LABEL_EXT],
            dtypes=[types.UINT8, types.UINT8], missing_component_behavior="error", **common)
        return encoded, parse_class_text(cls)
    encoded, labels = fn.readers.file(files=list(source.files), labels=list(source.labels),
                                      **common)
    return encoded, labels


def _parse_cls(samples: list) -> list:
    import numpy as np

    out = []
    for s in samples:
        text = bytes(np.asarray(s)).decode("ascii", "replace").strip()
        try:
            out.append(np.array([int(text)], dtype=np.int32))
        except ValueError:
            raise ValueError(f"WebDataset .cls must hold an integer class index, got {text!r}") from None
    return out


def parse_class_text(cls):
    """DataNode of ASCII class indices (WebDataset .cls) -> int32 (1,) labels."""
    from nvidia.dali import fn

    return fn.python_function(cls, function=_parse_cls, batch_processing=True)


def shard_size(num_samples: int, shard_id: int, num_shards: int) -> int:
    """Samples in DALI's shard `shard_id` of `num_shards` (before padding)."""
    return (shard_id + 1) * num_samples // num_shards - shard_id * num_samples // num_shards


def epoch_runs(num_samples: int, num_shards: int, batch_size: int) -> int:
    """Pipeline runs per epoch on every shard with pad_last_batch=True: ceil(ceil(N/S) / B)."""
    return -(-(-(-num_samples // num_shards)) // batch_size)
