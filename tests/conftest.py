"""Shared fixtures: real image trees encoded by the tests (see jpeg_factory.py), written once per
session under pytest's temporary folder, and the torch `device` (cpu; cuda, skipped without a
GPU: see devices.py). The helper modules of tests/ are importable by name (pyproject.toml's
pytest `pythonpath`)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import jpeg_factory as jf
from devices import DEVICES

N_INDEXED = 23          # odd on purpose: shards and batches never divide it


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """"cpu", then "cuda" (skipped without a CUDA GPU)."""
    return request.param


@pytest.fixture(scope="session")
def flavour_tree(tmp_path_factory):
    """ImageNet-layout tree, 3 classes x 8 files (.JPEG), every flavour of jf.FLAVOURS."""
    root = tmp_path_factory.mktemp("flavours") / "train"
    files, labels = jf.class_tree(root, classes=3, per_class=8, flavours=jf.FLAVOURS)
    return SimpleNamespace(root=root, files=files, labels=labels)


@pytest.fixture(scope="session")
def indexed(tmp_path_factory):
    """N_INDEXED uniformly coloured JPEGs whose colour encodes the index, as a `path label`
    list (label = index, relative paths) and as WebDataset shards of 8."""
    base = tmp_path_factory.mktemp("indexed")
    files = jf.indexed_images(base / "img", N_INDEXED)
    labels = list(range(N_INDEXED))
    listing = jf.file_list(base / "list.txt", files, labels, relative_to=base)
    shards = jf.webdataset(base / "wds", files, labels, per_shard=8)
    return SimpleNamespace(files=files, labels=labels, list=listing, wds=base / "wds",
                           shards=shards, n=N_INDEXED)
