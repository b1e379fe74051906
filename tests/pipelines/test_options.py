"""pipelines.options.DataOptions: the one declaration of the data options. Its validation names
field, value and valid range; the loaders take it whole (keywords replace its fields); train's
`data:` section is the same fields (one validation, prefixed `data.`)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pipelines.loader import TrainLoader, ValLoader
from pipelines.options import DataOptions, option_names
from train.config import DataConfig, TrainConfig, apply_overrides

PLAIN = dict(image_size=32, device="cpu", auto_augment=None, re_prob=0.0)


@pytest.mark.parametrize("field, value, message", [
    ("re_prob", 1.5, r"re_prob must be in \[0, 1\], got 1.5"),
    ("hflip", -0.1, r"hflip must be in \[0, 1\], got -0.1"),
    ("hw_decoder_load", 2.0, r"hw_decoder_load must be in \[0, 1\], got 2.0"),
    ("crop_pct", 0.0, r"crop_pct must be in \(0, 1\], got 0.0"),
    ("scale", (0.5, 0.2), r"scale must satisfy 0 < min <= max <= 1, got \(0.5, 0.2\)"),
    ("ratio", (2.0, 1.0), r"ratio must satisfy 0 < min <= max, got \(2.0, 1.0\)"),
    ("interpolation", "cubic", r"interpolation must be one of \('bicubic', .*got 'cubic'"),
    ("std", (0.2, 0.0, 0.2), r"std must be positive, got \(0.2, 0.0, 0.2\)"),
    ("image_size", (32, 0), r"image_size must be a positive int or \(H, W\), got \(32, 0\)"),
    ("image_size", True, r"image_size must be a positive int or \(H, W\), got True"),
    ("initial_fill", 0, r"initial_fill must be an int >= 1, got 0"),
])
def test_validation_names_field_value_and_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        DataOptions(**{field: value})
    if field == "image_size":       # train's is a single int: test_train_config_embeds_...
        return
    # train's config runs the same checks, the field named as its YAML key
    with pytest.raises(ValueError, match="data." + message):
        TrainConfig.from_dict({"data": {"demo": True, field: value if not isinstance(
            value, tuple) else list(value)}})


def test_defaults_are_the_deit_recipe_and_sequences_become_tuples():
    o = DataOptions(image_size=[32, 48], mean=[0.5] * 3, scale=[0.5, 1])
    assert o.hw == (32, 48) and o.mean == (0.5, 0.5, 0.5) and o.scale == (0.5, 1)
    d = DataOptions()
    assert (d.auto_augment, d.re_prob, d.hflip, d.crop_pct, d.hw_decoder_load) == \
        ("rand-m9-mstd0.5-inc1", 0.25, 0.5, 0.875, 0.65)
    assert d.hw == (224, 224) and d.interpolation == "bicubic" and d.ratio == (0.75, 4 / 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.re_prob = 0.0  # type: ignore[misc]


def test_train_config_embeds_the_options_whole():
    names = option_names()
    data_fields = [f.name for f in dataclasses.fields(DataConfig)]
    assert data_fields[:len(names)] == list(names)         # declared once, inherited
    assert issubclass(DataConfig, DataOptions)
    cfg = TrainConfig.from_dict(apply_overrides(
        {"data": {"demo": True}}, {"data.hw_decoder_load": 0.3, "data.re_prob": "0.1"}))
    opts = cfg.data.data_options()
    assert type(opts) is DataOptions and opts.hw_decoder_load == 0.3 and opts.re_prob == 0.1
    assert opts == DataOptions(hw_decoder_load=0.3, re_prob=0.1)
    assert DataConfig(demo=True).data_options() == DataOptions()   # the same defaults
    with pytest.raises(ValueError, match="data.image_size must be a positive int, got"):
        TrainConfig.from_dict({"data": {"demo": True, "image_size": [32, 48]}})
    with pytest.raises(ValueError, match=r"unknown key in section 'data' 'hw_decoder'"):
        apply_overrides({}, {"data.hw_decoder": 0.3})
    assert set(cfg.to_dict()["data"]) >= set(names)


def test_loaders_take_the_options_whole(indexed):
    opts = DataOptions(image_size=32, auto_augment=None, re_prob=0.0, crop_pct=1.0)
    kw = dict(image_size=32, auto_augment=None, re_prob=0.0, crop_pct=1.0)
    with TrainLoader(indexed.list, batch_size=4, options=opts, device="cpu", seed=1) as a, \
            TrainLoader(indexed.list, batch_size=4, device="cpu", seed=1, **kw) as b:
        assert a.options == b.options == opts and a.opts is a.options
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x["image"], y["image"]) and torch.equal(x["label_a"], y["label_a"])
    # keywords replace fields of `options`; the options are a value, never changed in place
    with ValLoader(indexed.list, batch_size=4, options=opts, device="cpu", image_size=16) as v:
        assert v.options == opts.replace(image_size=16) and opts.image_size == 32
        assert next(iter(v))["image"].shape == (4, 3, 16, 16)


def test_loader_argument_errors(indexed):
    with pytest.raises(TypeError, match=r"TrainLoader\(\) got an unexpected keyword argument "
                                        r"'re_porb' \(data options: image_size, auto_augment"):
        TrainLoader(indexed.list, batch_size=4, re_porb=0.1, **PLAIN)
    with pytest.raises(TypeError, match="options must be a DataOptions or None, got dict"):
        ValLoader(indexed.list, batch_size=4, device="cpu", options={"image_size": 32})
    with pytest.raises(ValueError, match=r"re_prob must be in \[0, 1\], got 2"):
        TrainLoader(indexed.list, batch_size=4, options=DataOptions(image_size=32),
                    device="cpu", re_prob=2)
    with pytest.raises(ValueError, match="dtype must be one of"):
        TrainLoader(indexed.list, batch_size=4, dtype="int8", **PLAIN)
