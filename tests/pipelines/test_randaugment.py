"""pipelines.randaugment vs timm 1.0.31: parser, op-choice/coin distribution, magnitude noise,
per-op outputs vs timm's PIL ops, fill, determinism. Real DALI CPU pipelines, fixed seeds."""
import dataclasses
import io
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageOps
from scipy import stats

import torch
from nvidia.dali import fn, pipeline_def
from pipelines.compat import shutdown_pipeline
from pipelines.randaugment import (
    OP_NAMES, RandAugmentPolicy, TRANSFORM_SETS, parse_policy, rand_augment)
from pipelines import randaugment as ra
from pipelines.ra_kernels import RandAugmentLayer, equalize
from timm.data import auto_augment as taa
from dali_checks import assert_checkpoint_resumes_exactly
import jpeg_factory as jf
from devices import DALI_DEVICES

FILL = (124, 116, 104)
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


def run(images, augment, *, batches=1, seed=0, conditionals=True):
    """Outputs of ``augment(x)`` over ``batches`` runs of the same uint8 HWC batch."""
    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None, seed=seed,
                  enable_conditionals=conditionals)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        return augment(x)

    p = pipe()
    p.build()
    return [np.array(t) for _ in range(batches) for t in p.run()[0]]


def policy(transforms, **kw):
    base = dict(magnitude=5.0, num_layers=2, prob=0.5, magnitude_std=0.0)
    return RandAugmentPolicy(transforms=tuple(transforms), **{**base, **kw})


def smooth_images(n, h=40, w=48, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.uniform(0, 255, (h // 8 + 1, w // 8 + 1, 3)).astype(np.float32)
        big = Image.fromarray(small.astype(np.uint8)).resize((w, h), Image.BILINEAR)
        out.append(np.array(big))
    return out


# ---- parser -------------------------------------------------------------------------------
def test_parse_deit_policy():
    p = parse_policy("rand-m9-mstd0.5-inc1")
    assert (p.magnitude, p.num_layers, p.prob, p.magnitude_std, p.magnitude_max) == (
        9, 2, 0.5, 0.5, 10)
    assert p.transforms[4:6] == ("PosterizeIncreasing", "SolarizeIncreasing")
    assert p.weights is None and len(p.transforms) == 15
    assert parse_policy("rand-mstd101").magnitude_std == float("inf")
    assert parse_policy("rand").magnitude == 10  # timm's default magnitude
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.magnitude = 3


@pytest.mark.parametrize("config", [
    "rand-m9-mstd0.5-inc1", "rand-m9-n2", "rand-n3-m7-p0.8-mstd1-mmax12", "rand-mstd101-inc1",
    "rand-m9-tweights", "rand-m5-t3a-inc1", "rand-m9-n3-t3aw", "rand",
])
def test_parse_matches_timm(config):
    ra = taa.rand_augment_transform(config, None)
    ours = parse_policy(config)
    assert ours.num_layers == ra.num_layers
    assert ours.transforms == tuple(op.name for op in ra.ops)
    assert {(op.prob, op.magnitude, op.magnitude_std, op.magnitude_max or 10) for op in ra.ops} \
        == {(ours.prob, ours.magnitude, ours.magnitude_std, ours.magnitude_max)}
    if ra.choice_weights is None:
        assert ours.weights is None
    else:
        np.testing.assert_allclose(np.array(ours.weights) / sum(ours.weights), ra.choice_weights)


@pytest.mark.parametrize("config, message", [
    ("rnd-m9", "must start with 'rand'"),
    ("rand-m9-x3", "unknown RandAugment key 'x' in section 'x3'"),
    ("rand-m9-foo", "unknown RandAugment key 'foo'"),
    ("rand--m9", "unknown RandAugment key ''"),
    ("rand-m9.5", "key 'm' needs an integer, got '9.5'"),
    ("rand-p0.5x", "key 'p' needs a number"),
    ("rand-m9-m8", "key 'm' given twice"),
    ("rand-mstd0.5-mstd1", "key 'mstd' given twice"),
    ("rand-tfoo", "unknown RandAugment transform set 'tfoo'.*tweights"),
    ("rand-inc2", "'inc' must be 0 or 1"),
    ("rand-mmax0", "'mmax' must be >= 1"),
    ("rand-p2", r"prob must be in \[0, 1\], got 2.0"),
    ("rand-n16-tweights", "num_layers=16 exceeds the 15 ops"),
])
def test_parse_errors(config, message):
    with pytest.raises(ValueError, match=message):
        parse_policy(config)


def test_policy_and_call_errors():
    with pytest.raises(TypeError, match="policy must be a str"):
        parse_policy(9)
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        RandAugmentPolicy(transforms=("Cutout",))
    with pytest.raises(ValueError, match="weights has 1 entries for 2 transforms"):
        RandAugmentPolicy(transforms=("Invert", "Equalize"), weights=(1.0,))
    with pytest.raises(ValueError, match="enable_conditionals=True"):
        run(smooth_images(2), rand_augment, conditionals=False)
    with pytest.raises(ValueError, match=r"fill must be None, an int or 3 ints in \[0, 255\]"):
        run(smooth_images(2), lambda x: rand_augment(x, fill=(1, 2)))
    with pytest.raises(TypeError, match="images must be a DALI DataNode"):
        rand_augment(np.zeros((4, 4, 3), np.uint8))


# ---- which ops run: exact enumeration of timm's process, chi-square -------------------------
def timm_outcomes(image, transforms, magnitude, prob, num_layers, weights=None):
    """{output bytes: probability} of timm's RandAugment, enumerated (ops without signs)."""
    pil_ops = [taa.AugmentOp(name, prob=1.0, magnitude=magnitude) for name in transforms]
    k = len(transforms)
    if weights is None:
        layer = [(None, 1 - prob)] * (prob < 1) + [(j, prob / k) for j in range(k)]
        seqs = [[]]
        for _ in range(num_layers):
            seqs = [s + [(j, q)] for s in seqs for j, q in layer]
    else:  # successive weighted sampling without replacement, prob 1
        w = np.array(weights, float)
        seqs = []
        for i in range(k):
            for j in range(k):
                if i != j:
                    seqs.append([(i, w[i] / w.sum()), (j, w[j] / (w.sum() - w[i]))])
    out = Counter()
    for seq in seqs:
        img = Image.fromarray(image)
        for j, _ in seq:
            img = img if j is None else pil_ops[j](img)
        out[np.array(img).tobytes()] += np.prod([q for _, q in seq])
    return out


@pytest.mark.parametrize("transforms, prob, layers, weights", [
    (("Invert", "Posterize"), 0.5, 2, None),  # timm: 5 distinct outputs (II = id, PP = P)
    (("PosterizeIncreasing",), 0.3, 3, None),  # P(unchanged) = 0.7 ** 3
    (("Invert", "Posterize", "SolarizeAdd"), 1.0, 2, (1.0, 2.0, 5.0)),  # no replacement
])
def test_op_choice_and_coin_match_timm(transforms, prob, layers, weights):
    image = smooth_images(1, 16, 16)[0]
    expected = timm_outcomes(image, transforms, 5.0, prob, layers, weights)
    if weights is not None:
        assert len(expected) == 6  # the 6 ordered pairs are distinguishable
    pol = policy(transforms, prob=prob, num_layers=layers, weights=weights)
    outs = run([image] * 500, lambda x: rand_augment(x, pol, seed=1), batches=6)
    observed = Counter(o.tobytes() for o in outs)
    assert set(observed) <= set(expected), "an output timm's process cannot produce"
    keys = sorted(expected, key=expected.get)
    f_obs = [observed[k] for k in keys]
    f_exp = [expected[k] * len(outs) for k in keys]
    assert stats.chisquare(f_obs, f_exp).pvalue > 1e-4, (f_obs, f_exp)


def test_deit_policy_leaves_a_quarter_unchanged():
    """rand-m9-mstd0.5-inc1: every op changes this image, so unchanged = no op applied (0.5 ** 2)
    or Invert twice ((0.5 / 15) ** 2)."""
    image = (30 + smooth_images(1, 16, 16)[0] * (170 / 255)).astype(np.uint8)
    outs = run([image] * 500, lambda x: rand_augment(x, seed=4), batches=4)
    unchanged = sum(np.array_equal(o, image) for o in outs)
    p = 0.25 + (0.5 / 15) ** 2
    assert stats.binomtest(unchanged, len(outs), p).pvalue > 1e-4, unchanged


# ---- magnitude noise: DALI's applied factor vs timm's, two-sample KS ------------------------
def brightness_factors(images):
    ramp = RAMP.astype(np.float64).ravel()
    return np.array([np.polyfit(ramp, img.astype(np.float64).ravel(), 1)[0] for img in images])


def signed_levels(images):
    """(factor - 1) / 0.09 on a 0.1 grid: PIL truncates, DALI rounds, which moves the fitted
    factor by < 0.001; the grid puts the clip atoms (level = mmax) of both in one bin."""
    return np.round((brightness_factors(images) - 1) / 0.09, 1)


RAMP = np.repeat(np.linspace(20, 130, 16 * 16).reshape(16, 16, 1), 3, axis=2).astype(np.uint8)


def timm_brightness_factors(magnitude, hparams, n):
    random.seed(0)
    op = taa.AugmentOp("BrightnessIncreasing", prob=1.0, magnitude=magnitude, hparams=hparams)
    return signed_levels([np.array(op(Image.fromarray(RAMP))) for _ in range(n)])


@pytest.mark.parametrize("config", ["rand-m9-mstd0.5", "rand-m9-mstd101", "rand-m7-mstd2-mmax8"])
def test_magnitude_noise_matches_timm(config):
    pol = dataclasses.replace(parse_policy(config), transforms=("BrightnessIncreasing",),
                              num_layers=1, prob=1.0)
    ours = signed_levels(run([RAMP] * 500, lambda x: rand_augment(x, pol, seed=2),
                                  batches=4))
    hp = dict(magnitude_std=pol.magnitude_std, magnitude_max=pol.magnitude_max)
    theirs = timm_brightness_factors(pol.magnitude, hp, 2000)
    assert stats.ks_2samp(ours, theirs).pvalue > 1e-3
    # the test can tell: timm with half the noise is rejected
    if pol.magnitude_std < 100:
        halved = timm_brightness_factors(pol.magnitude, {**hp, "magnitude_std":
                                                         pol.magnitude_std / 2}, 2000)
        assert stats.ks_2samp(ours, halved).pvalue < 1e-6


def test_fixed_magnitude_has_no_spread():
    pol = policy(["BrightnessIncreasing"], magnitude=9.0, num_layers=1, prob=1.0)
    f = brightness_factors(run([RAMP] * 64, lambda x: rand_augment(x, pol)))
    np.testing.assert_allclose(np.sort(np.abs(f - 1)), 0.81, atol=0.01)
    assert 10 < (f > 1).sum() < 54  # random sign


# ---- each op vs timm's PIL op at a fixed magnitude ------------------------------------------
EXACT = {"Invert", "Posterize", "PosterizeIncreasing", "Solarize", "SolarizeIncreasing",
         "SolarizeAdd", "Equalize"}


def pil_candidates(name, image, magnitude):
    """timm's op output for both signs of the argument (signed ops draw the sign at random)."""
    hp = dict(img_mean=FILL, interpolation=Image.BILINEAR)
    level_fn = taa.LEVEL_TO_ARG[name]
    args = level_fn(magnitude, hp) if level_fn else ()
    if name in SIGNED:
        arg_sets = [(abs(args[0]),), (-abs(args[0]),)]
    elif name.endswith("Increasing") and not name.startswith(("Posterize", "Solarize")):
        arg_sets = [(1 + abs(args[0] - 1),), (1 - abs(args[0] - 1),)]
    else:
        arg_sets = [args]
    op = taa.NAME_TO_OP[name]
    return [np.array(op(Image.fromarray(image), *a, fillcolor=FILL, resample=Image.BILINEAR))
            .astype(int) for a in arg_sets]


@pytest.mark.parametrize("kernels", ["pillow", "dali"])
@pytest.mark.parametrize("name", OP_NAMES)
def test_op_close_to_timm_pil(name, kernels):
    """Pillow kernels (the cpu default) equal timm's op bitwise; DALI's (the gpu path, run
    here on the cpu) are within the documented tolerance."""
    images = smooth_images(6)
    pol = policy([name], magnitude=7.0, num_layers=1, prob=1.0)
    outs = run(images, lambda x: rand_augment(x, pol, fill=FILL, kernels=kernels))
    for image, out in zip(images, outs):
        cands = pil_candidates(name, image, 7.0)
        errs = sorted((np.abs(c - out.astype(int)) for c in cands), key=np.mean)
        err, inner = errs[0], errs[0][1:-1, 1:-1]
        if kernels == "pillow":
            assert err.max() == 0, (name, err.max())
        elif name in EXACT:
            assert err.max() == 0
        elif name in SIGNED:  # +-1 inside; fill edges blend (bilinear); the sign must match
            assert (err > 1).mean() < 0.05 and errs[1].mean() > 10 * err.mean()
        elif name in ("Sharpness", "SharpnessIncreasing"):  # PIL leaves the 1 px border
            assert inner.max() <= 1
        elif name == "GaussianBlur":  # Gaussian vs PIL's box approximation
            assert inner.max() <= 3
        else:  # blends: rounding only
            assert err.max() <= 2, (name, err.max())


def test_posterize_zero_bits_is_black_where_pillow13_raises():
    image = smooth_images(1, 16, 16)[0]
    pol = policy(["PosterizeIncreasing"], magnitude=10.0, num_layers=1, prob=1.0)
    assert not run([image] * 4, lambda x: rand_augment(x, pol))[0].any()
    with pytest.raises(ValueError, match="bits must be between"):
        taa.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(Image.fromarray(image))


@pytest.mark.parametrize("fill", [FILL, 128])
def test_translate_uncovers_fill(fill):
    images = smooth_images(8, 20, 40)
    pol = policy(["TranslateXRel"], magnitude=10.0, num_layers=1, prob=1.0)
    want = np.broadcast_to(np.array(fill, np.uint8), (20, 16, 3))
    for out in run(images, lambda x: rand_augment(x, pol, fill=fill)):
        left, right = out[:, :16], out[:, -16:]  # 0.45 * 40 = 18 px shift, either way
        assert np.array_equal(left, want) or np.array_equal(right, want)


# ---- Equalize: Pillow's formula on both backends ---------------------------------------------
def equalize_inputs():
    """Crops of decoded photo-like JPEGs, the same with clipped highlights (x2 + 40, a third of
    the pixels at 255), and degenerate histograms (flat, one odd pixel, two levels, 1x1)."""
    rng = np.random.default_rng(7)
    out = []
    for _ in range(6):
        jpeg = jf.encode(jf.smooth_image(rng, 64, 80), quality=85)
        photo = np.array(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        y, x = rng.integers(0, 20, 2)
        out.append(np.ascontiguousarray(photo[y:y + 41, x:x + 47]))
        out.append(np.clip(photo.astype(int) * 2 + 40, 0, 255).astype(np.uint8))
    flat = np.full((9, 7, 3), 200, np.uint8)
    odd = flat.copy()
    odd[0, 0] = (3, 254, 200)
    two = np.where(rng.random((12, 10, 1)) < 0.3, 255, 10).repeat(3, 2).astype(np.uint8)
    return out + [flat, odd, two, np.full((1, 1, 3), 77, np.uint8)]


def test_equalize_kernel_is_pillow_bitwise(device):
    inputs = equalize_inputs()
    assert np.mean(inputs[1] == 255) > 0.3                       # highlights really clip
    for image in inputs:
        want = np.array(ImageOps.equalize(Image.fromarray(image)))
        got = equalize(torch.from_numpy(image).to(device)).cpu().numpy()
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("device", DALI_DEVICES)
def test_equalize_in_the_dali_graph_is_pillow_bitwise(device):
    """The DALI-kernel path (the gpu default) runs the torch kernel inside the conditional
    split of auto_aug, on the images' device; the draws leave some images alone."""
    inputs = equalize_inputs()
    pol = policy(["Equalize"], num_layers=1, prob=0.6)

    @pipeline_def(batch_size=len(inputs), num_threads=2, device_id=0 if device == "gpu" else None,
                  seed=3, enable_conditionals=True)
    def pipe():
        x = fn.external_source(source=lambda: inputs, batch=True, layout="HWC")
        return rand_augment(x.gpu() if device == "gpu" else x, pol, kernels="dali")

    p = pipe()
    p.build()
    outs = []
    for _ in range(3):
        out = p.run()[0]
        outs += [np.array(t) for t in (out.as_cpu() if device == "gpu" else out)]
    touched = 0
    for image, out in zip(inputs * 3, outs):
        want = np.array(ImageOps.equalize(Image.fromarray(image)))
        assert np.array_equal(out, want) or np.array_equal(out, image)
        touched += not np.array_equal(out, image)
    assert 0 < touched < len(outs)


def test_torch_equalize_rejects_bad_images():
    from pipelines.ra_kernels import TorchEqualize
    from torch.utils.dlpack import to_dlpack

    with pytest.raises(ValueError, match=r"Equalize expects HWC uint8 images, got shape \(4, 4\)"):
        TorchEqualize("cpu")([to_dlpack(torch.zeros(4, 4, dtype=torch.uint8))])


# ---- shapes, dtype, determinism -------------------------------------------------------------
def test_shape_and_dtype_preserved_for_mixed_sizes():
    images = smooth_images(2, 17, 23) + smooth_images(2, 32, 32) + smooth_images(2, 40, 24)
    for config in ("rand-m9-mstd0.5-inc1", "rand-m9-n3-t3aw", "rand-m9-mstd101-tweights"):
        outs = run(images, lambda x: rand_augment(x, config, seed=5), batches=2)
        assert [o.shape for o in outs] == [i.shape for i in images] * 2
        assert all(o.dtype == np.uint8 for o in outs)


def test_deterministic_given_seeds():
    images = smooth_images(16, 24, 24)
    a = run(images, lambda x: rand_augment(x), seed=11, batches=3)
    b = run(images, lambda x: rand_augment(x), seed=11, batches=3)
    c = run(images, lambda x: rand_augment(x), seed=12, batches=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    # an explicit seed fixes the op's draws whatever the pipeline seed
    small = policy(["Invert", "PosterizeIncreasing", "Rotate"], magnitude_std=0.5)
    d = run(images, lambda x: rand_augment(x, small, seed=7), seed=1, batches=2)
    e = run(images, lambda x: rand_augment(x, small, seed=7), seed=2, batches=2)
    assert all(np.array_equal(x, y) for x, y in zip(d, e))


def test_noop_policies_return_input():
    images = smooth_images(4, 16, 16)
    for pol in (policy(["Invert"], prob=0.0), policy(["Invert"], num_layers=0)):
        outs = run(images, lambda x: rand_augment(x, pol))
        assert all(np.array_equal(i, o) for i, o in zip(images, outs))


def test_every_named_set_resolves():
    for name, (transforms, _) in TRANSFORM_SETS.items():
        assert set(transforms) <= set(OP_NAMES), name


@pytest.mark.filterwarnings("ignore:Checkpointing enabled")
@pytest.mark.parametrize("kernels", ["pillow", "dali"])
def test_checkpoint_resume_is_exact(kernels):
    """The train pipeline resumes from DALI checkpoints: RA's random state must be in them."""
    images = smooth_images(8, 24, 24)

    @pipeline_def(batch_size=8, num_threads=2, device_id=None, seed=5,
                  enable_conditionals=True, enable_checkpointing=True)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        return rand_augment(x, "rand-m9-mstd0.5-inc1", kernels=kernels)

    assert_checkpoint_resumes_exactly(pipe)


# ---- the two kernel sets: same draws, same arguments ----------------------------------------
def test_pillow_and_dali_kernels_make_the_same_draws():
    """Ops both kernel sets compute bitwise: identical batches for the same seeds, so the
    decisions (op, coin, magnitude noise, sign) are shared and only the kernels differ."""
    images = smooth_images(48, 24, 24, seed=3)
    pol = policy(["Invert", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
                  "Equalize"], magnitude=9.0, magnitude_std=2.0, num_layers=3)
    outs = {k: run(images, lambda x: rand_augment(x, pol, seed=4, kernels=k), batches=2)
            for k in ("pillow", "dali")}
    assert all(np.array_equal(a, b) for a, b in zip(outs["pillow"], outs["dali"]))
    changed = sum(not np.array_equal(i, o) for i, o in zip(images * 2, outs["pillow"]))
    assert 48 < changed < 96  # the coin leaves some images alone, not all


@pytest.mark.parametrize("name", [n for n in OP_NAMES if ra._OP_TABLE[n][1] is not None])
def test_level_maps_agree_between_dali_and_numpy(name):
    """One expression per level map, evaluated by DALI (gpu path) and numpy (Pillow path)."""
    levels = np.linspace(-10.0, 10.0, 81, dtype=np.float32)  # DALI: float32, numpy: float64
    to_arg = ra._OP_TABLE[name][1]

    @pipeline_def(batch_size=len(levels), num_threads=1, device_id=None)
    def pipe():
        level = fn.external_source(source=lambda: list(levels), batch=True)
        return to_arg(level)

    p = pipe()
    p.build()
    dali = np.array([np.array(t) for t in p.run()[0]])
    shutdown_pipeline(p)
    host = np.array([to_arg(v, ra._NUMPY) for v in levels])
    np.testing.assert_allclose(dali.astype(np.float64), host.astype(np.float64), rtol=1e-6,
                               atol=1e-6)


def test_kernel_choice_errors():
    images = smooth_images(2)
    with pytest.raises(ValueError, match="kernels must be one of"):
        run(images, lambda x: rand_augment(x, kernels="cuda"))
    with pytest.raises(ValueError, match="fill=None, repeat the border, needs kernels='dali'"):
        run(images, lambda x: rand_augment(x, fill=None, kernels="pillow"))
    # auto with fill=None falls back to DALI's kernels (Pillow cannot repeat the border)
    assert len(run(images, lambda x: rand_augment(x, fill=None))) == 2


def test_pillow_layer_rejects_bad_images_and_indices():
    layer = RandAugmentLayer(["Invert"], [None], ra._NUMPY, (0, 0, 0))
    with pytest.raises(ValueError, match="HWC uint8 RGB"):
        layer.one(np.zeros((4, 4), np.uint8), 0, 1.0)
    with pytest.raises(ValueError, match="op index 3 out of range"):
        layer.one(np.zeros((4, 4, 3), np.uint8), 3, 1.0)
    with pytest.raises(ValueError, match="no Pillow kernel"):
        RandAugmentLayer(["Cutout"], [None], ra._NUMPY, (0, 0, 0))


def test_pillow_kernels_refuse_gpu_images():
    """Checked while the graph is traced, so it needs no GPU."""
    @pipeline_def(batch_size=2, num_threads=1, device_id=None, enable_conditionals=True)
    def pipe():
        x = fn.external_source(source=lambda: smooth_images(2), batch=True, layout="HWC")
        return rand_augment(x.gpu(), kernels="pillow")

    with pytest.raises(ValueError, match="kernels='pillow' runs on cpu images only"):
        pipe()
