import pytest

from mixpro_dali import PRESETS, MixConfig


def test_defaults_are_the_paper():
    c = MixConfig()
    assert (c.rounding, c.partner, c.per_sample_ratio, c.beta) == ("floor", "flip", False, 1.0)
    assert c.probs == {"maskmix": 0.5, "mixup": 0.5}
    assert c.image_size == (224, 224) and c.token_grid == (14, 14) and c.cell_grid == (4, 4)


def test_presets_match_method_doc():
    off = MixConfig.preset("mixpro-official", image_size=224, patch_size=14, mask_patch=56)
    assert off.probs == {"maskmix": 0.5, "mixup": 0.25, "cutmix": 0.25}
    assert off.rounding == "ceil" and off.cell_grid == (4, 4)
    # official code: MaskMix pairs by random permutation, timm's Mixup (Mixup/CutMix) by flip
    assert off.partner == {"maskmix": "perm", "mixup": "flip", "cutmix": "flip"}
    assert [off.partner_for(m) for m in ("maskmix", "mixup", "cutmix", "none")] == [
        "perm", "flip", "flip", "flip"]
    assert MixConfig.preset("mixpro").partner_for("maskmix") == "flip"
    assert MixConfig.preset("deit").probs == {"mixup": 0.5, "cutmix": 0.5}
    assert MixConfig.preset("transmix").probs == {"cutmix": 0.5, "mixup": 0.5}
    assert MixConfig.preset("none").probs == {}
    assert MixConfig.preset("mixpro", seed=3).seed == 3
    assert {"mixpro", "mixpro-official", "transmix", "deit", "none"} <= set(PRESETS)


def test_edge_cells_and_round_trip():
    c = MixConfig(image_size=(224, 160), patch_size=16, mask_patch=48)
    assert c.token_grid == (14, 10) and c.cell_grid == (5, 4)
    assert MixConfig.from_dict(c.to_dict()) == c
    per_mode = MixConfig(partner={"maskmix": "perm"})           # modes left out: flip
    assert per_mode.partner == {"mixup": "flip", "cutmix": "flip", "maskmix": "perm"}
    assert MixConfig.from_dict(per_mode.to_dict()) == per_mode


@pytest.mark.parametrize("kwargs,match", [
    (dict(mask_patch=56), r"mask_patch must be a positive multiple of patch_size=16, got 56"),
    (dict(mask_patch=0), r"mask_patch must be a positive int, got 0"),
    (dict(patch_size=-2), r"patch_size must be a positive int"),
    (dict(image_size=100), r"image_size 100x100 must be a multiple of patch_size=16"),
    (dict(image_size=(0, 32)), r"image_size must be positive"),
    (dict(probs={"maskmix": 1.2}), r"probs\['maskmix'\] must be in \[0, 1\], got 1.2"),
    (dict(probs={"maskmix": 0.6, "mixup": 0.6}), r"probs must sum to <= 1"),
    (dict(probs={"mask_mix": 0.5}), r"probs: unknown mode 'mask_mix'; valid modes: mixup, cutmix, maskmix"),
    (dict(beta=0), r"beta must be a positive number, got 0"),
    (dict(mixup_alpha=-1.0), r"mixup_alpha must be a positive number"),
    (dict(cutmix_alpha="1"), r"cutmix_alpha must be a positive number"),
    (dict(rounding="round"), r"rounding must be 'floor' or 'ceil', got 'round'"),
    (dict(partner="shift"), r"partner must be 'flip' or 'perm' \(or a mapping mode -> one of "
                            r"them\), got 'shift'"),
    (dict(partner={"mask_mix": "perm"}), r"partner: unknown mode 'mask_mix'; valid modes: mixup"),
    (dict(partner={"cutmix": "roll"}), r"partner\['cutmix'\] must be 'flip' or 'perm', got 'roll'"),
    (dict(seed=-1), r"seed must be a non-negative int, got -1"),
])
def test_invalid_values_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(image_size="big"), r"image_size must be an int or \(H, W\)"),
    (dict(probs=[0.5]), r"probs must be a mapping"),
    (dict(per_sample_ratio=1), r"per_sample_ratio must be a bool"),
])
def test_invalid_types(kwargs, match):
    with pytest.raises(TypeError, match=match):
        MixConfig(**kwargs)


def test_from_dict_rejects_unknown_and_hyphenated_keys():
    with pytest.raises(ValueError, match=r"'mask-patch' \(did you mean 'mask_patch'\?\).*valid keys: image_size"):
        MixConfig.from_dict({"mask-patch": 32})
    with pytest.raises(ValueError, match=r"unknown mix config key\(s\) 'mixup_prob'"):
        MixConfig.from_dict({"mixup_prob": 0.8})
    with pytest.raises(TypeError, match=r"mix config must be a mapping, got list"):
        MixConfig.from_dict([1])
    with pytest.raises(ValueError, match=r"unknown preset 'mixpro2'; valid presets: .*mixpro-official"):
        MixConfig.preset("mixpro2")


def test_frozen():
    with pytest.raises(Exception, match="cannot assign"):
        MixConfig().seed = 3
