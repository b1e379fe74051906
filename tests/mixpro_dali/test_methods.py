"""The method registry (mixpro_dali.methods + the mode table of mixpro_dali.masks): every built-in
row builds its MixConfig and reproduces the old tables, and a toy method (a new mask strategy,
"stripes") registered in a fixture runs through MixConfig, sample_mix / apply_mix, mix_targets,
the DALI loader and a real training run without any other change: one row."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mixpro_dali import (MODES, PRESETS, MixConfig, Method, Mode, apply_mix, mix_targets,
                         register_method, register_mode, sample_mix, unregister_method,
                         unregister_mode)
from mixpro_dali.masks import apply_tokens, area_lambda, mixing_modes
from mixpro_dali.methods import METHODS, base_methods, get_method, resolve_method

from train_fixtures import make_tree, tiny_config


def test_builtin_rows_reproduce_the_old_tables():
    assert MODES == {"none": 0, "mixup": 1, "cutmix": 2, "maskmix": 3}
    assert mixing_modes() == ("mixup", "cutmix", "maskmix")
    assert PRESETS == {
        "none": {"probs": {}},
        "deit": {"probs": {"mixup": 0.5, "cutmix": 0.5}},
        "transmix": {"probs": {"cutmix": 0.5, "mixup": 0.5}},
        "maskmix": {"probs": {"maskmix": 1.0}},
        "mixpro": {"probs": {"maskmix": 0.5, "mixup": 0.5}, "rounding": "floor",
                   "partner": "flip"},
        "mixpro-official": {"probs": {"maskmix": 0.5, "mixup": 0.25, "cutmix": 0.25},
                            "rounding": "ceil",
                            "partner": {"maskmix": "perm", "mixup": "flip", "cutmix": "flip"}},
    }
    from train.losses import LABEL_METHOD
    assert LABEL_METHOD == {"none": "area", "deit": "area", "transmix": "transmix",
                            "maskmix": "area", "mixpro": "mixpro", "mixpro-official": "mixpro"}
    from train.config import METHODS as TRAIN_METHODS
    assert TRAIN_METHODS == ("none", "deit", "transmix", "maskmix", "mixpro") == base_methods()
    for name in METHODS:
        MixConfig.preset(name, image_size=32, patch_size=8, mask_patch=16)


def test_resolve_method_and_errors():
    assert resolve_method("mixpro", "official").name == "mixpro-official"
    assert resolve_method("mixpro", "paper").name == "mixpro"
    assert resolve_method("deit").name == "deit"
    with pytest.raises(ValueError, match=r"label_variant='official' applies to method='mixpro' only, "
                                         r"got method='deit'"):
        resolve_method("deit", "official")
    with pytest.raises(ValueError, match=r"unknown method 'pal'; valid methods: none, deit"):
        get_method("pal")
    with pytest.raises(ValueError, match=r"probs has unknown mode 'stripes'"):
        register_method(Method("x", {"stripes": 0.5}))
    with pytest.raises(ValueError, match=r"label must be one of \('mixpro', 'transmix', 'area'\)"):
        register_method(Method("x", {"mixup": 0.5}, label="pal"))
    with pytest.raises(ValueError, match=r"method name must be a new non-empty string, got 'deit'"):
        register_method(Method("deit", {}))
    with pytest.raises(ValueError, match=r"mode code must be a new int in \[0, 2\*\*31\), got 3"):
        register_mode(Mode(3, "again", None, None))
    with pytest.raises(ValueError, match="built-in method 'mixpro' cannot be removed"):
        unregister_method("mixpro")
    with pytest.raises(ValueError, match="built-in mode 'maskmix' cannot be removed"):
        unregister_mode("maskmix")


# --- the toy method: one mode row + one method row --------------------------------------------
def sample_stripes(rng: np.random.Generator, config: MixConfig, batch_size: int):
    """Keep the top n token rows of each sample, n ~ U{1, h-1} per batch."""
    h, w = config.token_grid
    token_mask = torch.ones(batch_size, h, w, dtype=torch.uint8)
    token_mask[:, int(rng.integers(1, h)):] = 0
    return token_mask, area_lambda(token_mask), 1.0


@pytest.fixture
def stripemix():
    register_mode(Mode(7, "stripes", sample_stripes, apply_tokens))
    register_method(Method("stripemix", {"stripes": 0.5, "mixup": 0.5}, label="mixpro",
                           label_modes=("stripes",), summary="toy: PAL on top-row stripes"))
    yield
    unregister_method("stripemix")
    unregister_mode("stripes")


def test_toy_method_draws_applies_and_labels(stripemix):
    cfg = MixConfig.preset("stripemix", image_size=32, patch_size=8, mask_patch=8, seed=2)
    assert cfg.probs == {"stripes": 0.5, "mixup": 0.5} and MODES["stripes"] == 7
    seen = set()
    for k in range(40):
        p = sample_mix(cfg, 6, k)
        seen.add(p.mode)
        images = torch.rand(6, 3, 32, 32)
        out = apply_mix(images, p, patch_size=8, layout="CHW")
        if p.mode == 7:  # slow reference: pixel mask, partner's pixels where the mask is 0
            m = p.token_mask.repeat_interleave(8, 1).repeat_interleave(8, 2).bool()[:, None]
            assert torch.equal(out, torch.where(m, images, images[p.partner]))
            rows = p.token_mask[:, :, 0].sum(1)
            assert torch.equal(p.lam, rows.float() / 4) and 1 <= int(rows[0]) <= 3
    assert seen == {1, 7}
    # PAL applies on the stripes rows (label_modes), area labels elsewhere
    p = next(sample_mix(cfg, 6, k) for k in range(40) if sample_mix(cfg, 6, k).mode == 7)
    B, mode = 6, torch.full((6,), p.mode, dtype=torch.int32)
    logits, attn = torch.randn(B, 5), torch.rand(B, 16).softmax(1)
    y = torch.arange(B) % 5
    pal = mix_targets(logits, y, y[p.partner], p.lam, mode, p.token_mask, attn, num_classes=5,
                      label_modes=get_method("stripemix").attention_modes)
    assert torch.isfinite(pal.alpha).all() and not torch.equal(pal.lam, p.lam)
    default = mix_targets(logits, y, y[p.partner], p.lam, mode, p.token_mask, attn,
                          num_classes=5)
    assert torch.isnan(default.alpha).all() and torch.equal(default.lam, p.lam)


def test_toy_method_trains_end_to_end(stripemix, tmp_path):
    """The real trainer (DALI loader, timm ViT, MixLoss with PAL, checkpoint) on a JPEG tree,
    `mix.method: stripemix`: no file outside the two rows above knows the method."""
    from train.config import TrainConfig
    from train.main import run
    tree = make_tree(tmp_path / "tree")
    d = tiny_config(tree, tmp_path / "run", "stripemix", data={"batch_size": 12})
    res = run(TrainConfig.from_dict(d))
    assert np.isfinite(res["train_loss"]) and res["history"][0]["count"] == 15
    h = res["history"][0]["row"]  # the summary.csv row of the epoch
    assert h["train_mode_stripes"] + h["train_mode_mixup"] == 1.0
    assert "train_pal_alpha_mean" in h
