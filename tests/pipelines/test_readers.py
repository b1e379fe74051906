"""Sources: layouts, class indices, file lists, WebDataset shard patterns, exclusion, errors."""
import os

import numpy as np
import pytest
import torchvision

import jpeg_factory as jf
from pipelines.readers import (Source, epoch_runs, read_exclude, read_file_list, resolve_source,
                               shard_size)


def test_class_index_is_torchvision_imagefolder_order(tmp_path):
    # names whose sorted order differs from creation order and from case-insensitive order
    for name in ("n02", "N01", "b", "a10", "a9"):
        jf.write(tmp_path / name / "x.jpg", jf.encode(jf.smooth_image(np.random.default_rng(0), 8, 8)))
    jf.write(tmp_path / "a9" / "sub" / "y.JPEG", (tmp_path / "a9" / "x.jpg").read_bytes())
    src = resolve_source(tmp_path)
    ref = torchvision.datasets.ImageFolder(str(tmp_path))
    assert src.kind == "folder"
    assert list(src.classes) == ref.classes
    assert [(f, lab) for f, lab in zip(src.files, src.labels)] == [(os.path.abspath(p), lab) for p, lab in ref.samples]


def test_flavour_tree_lists_every_file(flavour_tree):
    src = resolve_source(flavour_tree.root)
    assert list(src.files) == flavour_tree.files and list(src.labels) == flavour_tree.labels
    assert src.classes == ("class_0", "class_1", "class_2")


def test_file_list_relative_paths_spaces_and_comments(tmp_path):
    jf.write(tmp_path / "my dir" / "a b.jpg", b"x")
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text("# comment\n\n../my dir/a b.jpg 7\n/abs/c.jpg 0\n")
    files, labels = read_file_list(lst)
    assert files == [str(tmp_path / "my dir" / "a b.jpg"), "/abs/c.jpg"] and labels == [7, 0]
    assert resolve_source(lst).kind == "list"


@pytest.mark.parametrize("line", ["a.jpg", "a.jpg x", "a.jpg -1"])
def test_file_list_bad_line_names_line(tmp_path, line):
    lst = tmp_path / "l.txt"
    lst.write_text(f"ok.jpg 1\n{line}\n")
    with pytest.raises(ValueError, match=r"l\.txt:2: expected 'path label'"):
        read_file_list(lst)


def test_missing_and_empty_sources_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_source(tmp_path / "nope")
    with pytest.raises(ValueError, match="no class folders"):
        resolve_source(tmp_path)
    (tmp_path / "cls_a").mkdir()
    jf.write(tmp_path / "cls_b" / "x.jpg", b"x")
    (tmp_path / "cls_a" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"1 class folder\(s\) .* contain no images .*cls_a"):
        resolve_source(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="has no entries"):
        resolve_source(empty)


def test_exclude_from_scan_output_and_lists(flavour_tree, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{flavour_tree.files[0]}\tempty file\n{flavour_tree.files[5]}\n")
    src = resolve_source(flavour_tree.root, exclude=bad)
    assert len(src.files) == len(flavour_tree.files) - 2 and src.excluded == 2
    assert flavour_tree.files[0] not in src.files and flavour_tree.files[5] not in src.files
    assert read_exclude([flavour_tree.files[1]]) == {flavour_tree.files[1]}
    with pytest.raises(FileNotFoundError, match="exclude list .* does not exist"):
        resolve_source(flavour_tree.root, exclude=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="removed every file"):
        resolve_source(flavour_tree.root, exclude=flavour_tree.files)


def test_webdataset_patterns(indexed):
    expect = tuple(os.path.abspath(s) for s in indexed.shards)
    assert resolve_source(indexed.wds) == Source(kind="webdataset", root=str(indexed.wds), tars=expect)
    assert resolve_source(str(indexed.wds / "shard-*.tar")).tars == expect
    assert resolve_source(str(indexed.wds / "shard-{000..002}.tar")).tars == expect
    assert resolve_source(str(indexed.wds / "shard-{000,002}.tar")).tars == (expect[0], expect[2])
    assert resolve_source(indexed.shards).tars == expect
    assert resolve_source(indexed.shards[1]).tars == (expect[1],)
    with pytest.raises(FileNotFoundError, match="shard-007.tar"):
        resolve_source(str(indexed.wds / "shard-{000..007}.tar"))
    with pytest.raises(ValueError, match="exclude= works for class folders and file lists only"):
        resolve_source(indexed.wds, exclude=["x"])


@pytest.mark.parametrize("n,s", [(23, 2), (23, 3), (10, 4), (7, 7), (1000, 8)])
def test_shards_partition_the_data(n, s):
    sizes = [shard_size(n, i, s) for i in range(s)]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
    for b in (1, 4, 5, 64):
        assert epoch_runs(n, s, b) * b >= max(sizes) > (epoch_runs(n, s, b) - 1) * b
