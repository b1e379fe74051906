"""timm's order RandomResizedCrop -> horizontal flip -> RandAugment, kept by the training
pipeline: the two orders differ for ShearY (y' = y + f*x is not mirror-symmetric), whose fill
wedge lands on one side in timm's order. Real DALI CPU pipelines, timm's own ops, JPEG files."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import jpeg_factory as jf
from nvidia.dali import fn, pipeline_def, types
from pipelines.decode import IMAGENET_MEAN, IMAGENET_STD, normalize
from pipelines.loader import TrainLoader
from pipelines.randaugment import RandAugmentPolicy, flip_rand_augment, parse_policy, rand_augment
from timm.data import auto_augment as taa

FILL = (124, 116, 104)                  # round(255 * mean): timm create_transform's img_mean
SHEAR_Y = RandAugmentPolicy(magnitude=9.0, num_layers=1, prob=1.0, transforms=("ShearY",))
H, W = 32, 40


def wedge_sides(images):
    """Per image (HWC uint8): +1 if the fill wedge lies in the right half, -1 left, 0 none;
    and +1 / -1 for a wedge at the bottom / top (the shear's sign)."""
    sides, rows = [], []
    for im in images:
        fill = (np.abs(im.astype(int) - FILL).max(-1) <= 2)               # (H, W)
        if fill.sum() < 4:
            sides.append(0), rows.append(0)
            continue
        ys, xs = np.nonzero(fill)
        sides.append(int(np.sign(xs.mean() - (im.shape[1] - 1) / 2)))
        rows.append(int(np.sign(ys.mean() - (im.shape[0] - 1) / 2)))
    return np.array(sides), np.array(rows)


def timm_sides(n, seed=0):
    """timm's own transforms (flip p=0.5, then RandAugment with ShearY only at m9) on white."""
    torch.manual_seed(seed)
    import random
    random.seed(seed)
    hp = {"img_mean": FILL, "interpolation": Image.BILINEAR}
    ra = taa.RandAugment([taa.AugmentOp("ShearY", prob=1.0, magnitude=9, hparams=hp)], 1)
    tf = T.Compose([T.RandomHorizontalFlip(0.5), ra])
    white = Image.fromarray(np.full((H, W, 3), 255, np.uint8))
    return wedge_sides([np.array(tf(white)) for _ in range(n)])


def denormalize(batch):
    """(B, 3, H, W) normalized float -> list of HWC uint8."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    px = ((batch.float() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return list(px.permute(0, 2, 3, 1).numpy())


@pytest.fixture(scope="module")
def white_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("white")
    for k in range(2):
        for i in range(16):
            jf.write(root / f"class_{k}" / f"img_{i:03d}.JPEG",
                     jf.encode(np.full((48, 64, 3), 255, np.uint8), quality=95))
    return root


def test_timm_sheary_wedge_is_always_on_one_side():
    """Measured on timm: the wedge is on the right for both shear signs, whatever the flip."""
    sides, rows = timm_sides(200)
    assert set(sides.tolist()) == {1}
    assert {-1, 1} <= set(rows.tolist())          # both signs were drawn (top and bottom)


def test_training_pipeline_matches_timm_wedge_side(white_tree):
    """The real training pipeline (JPEG -> RRC -> flip -> RandAugment -> normalize) puts the
    wedge on timm's side every time."""
    timm_side = timm_sides(50)[0][0]
    loader = TrainLoader(white_tree, batch_size=16, image_size=(H, W), device="cpu", seed=3,
                         auto_augment=SHEAR_Y, re_prob=0.0, scale=(0.5, 1.0))
    sides, rows = [], []
    for _ in range(3):
        for batch in loader:
            s, r = wedge_sides(denormalize(batch["image"]))
            sides += s.tolist()
            rows += r.tolist()
    assert len(sides) == 96 and set(sides) == {timm_side}
    assert {-1, 1} <= set(rows)


def run(images, augment, seed=0):
    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None, seed=seed,
                  enable_conditionals=True)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        return augment(x)

    p = pipe()
    p.build()
    return [[np.array(t) for t in out] for out in p.run()]


@pytest.mark.parametrize("kernels", ["pillow", "dali"])     # dali: the GPU path's kernels
def test_wedge_side_per_order_and_kernels(kernels):
    """flip_rand_augment + normalize(mirror=owed) keeps timm's side; the order this pipeline
    used before (RandAugment, then the flip in normalize) puts the wedge on either side."""
    white = [np.full((H, W, 3), 255, np.uint8)] * 64
    timm_side = timm_sides(50)[0][0]
    norm = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype="float32")

    def timm_order(x):
        mirror = fn.random.coin_flip(probability=0.5, seed=1)
        x, left = flip_rand_augment(x, mirror, SHEAR_Y, fill=FILL, seed=2, kernels=kernels)
        return normalize(x, mirror=left, **norm)

    def old_order(x):
        mirror = fn.random.coin_flip(probability=0.5, seed=1)
        x = rand_augment(x, SHEAR_Y, fill=FILL, seed=2, kernels=kernels)
        return normalize(x, mirror=mirror, **norm)

    for order, expected in ((timm_order, {timm_side}), (old_order, {-1, 1})):
        (out,) = run(white, order)
        sides, rows = wedge_sides(denormalize(torch.from_numpy(np.stack(out))))
        assert set(sides.tolist()) == expected and {-1, 1} <= set(rows.tolist())


@pytest.mark.parametrize("kernels", ["pillow", "dali"])
@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m9-n3-p1.0"])
def test_deferred_flip_equals_flip_first(kernels, policy):
    """flip_rand_augment flips a sample inside its first applied op and leaves the others'
    flip to the caller: after that owed flip the images equal flip-then-RandAugment exactly,
    with the same draws, and the owed flips are the samples no op touched."""
    images = [jf.smooth_image(np.random.default_rng(i), 36, 44) for i in range(24)]
    pol = parse_policy(policy)

    def deferred(x):
        mirror = fn.random.coin_flip(probability=0.5, seed=1)
        y, left = flip_rand_augment(x, mirror, pol, seed=2, kernels=kernels)
        return y, left, mirror

    def flip_first(x):
        mirror = fn.random.coin_flip(probability=0.5, seed=1)
        return rand_augment(fn.flip(x, horizontal=mirror), pol, seed=2, kernels=kernels)

    for seed in (0, 1):
        y, left, mirror = run(images, deferred, seed)
        (ref,) = run(images, flip_first, seed)
        left = np.array(left).ravel()
        assert set(left.tolist()) <= {0, 1} and (left <= np.array(mirror).ravel()).all()
        for i in range(len(images)):
            out = y[i][:, ::-1] if left[i] else y[i]
            np.testing.assert_array_equal(out, ref[i])
            if left[i]:                         # owed: no op touched it
                np.testing.assert_array_equal(y[i], images[i])
        if pol.prob == 1.0:
            assert not left.any()
        else:
            assert 0 < left.sum() < np.array(mirror).sum()


def test_flip_rand_augment_errors_and_no_flip():
    images = [jf.smooth_image(np.random.default_rng(0), 16, 16)] * 2
    with pytest.raises(TypeError, match="mirror must be a DALI DataNode of per-sample 0/1 or "
                                        "None, got int"):
        run(images, lambda x: flip_rand_augment(x, 1, SHEAR_Y))
    # mirror None: plain RandAugment, nothing owed; a no-op policy hands the flips back
    (a,) = run(images, lambda x: flip_rand_augment(x, None, SHEAR_Y, seed=2)[0])
    (b,) = run(images, lambda x: rand_augment(x, SHEAR_Y, seed=2))
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    noop = RandAugmentPolicy(num_layers=0)

    def none_applied(x):
        mirror = fn.cast(fn.random.coin_flip(probability=1.0, seed=1), dtype=types.INT32)
        return flip_rand_augment(x, mirror, noop)
    y, left = run(images, none_applied)
    assert np.array(left).ravel().tolist() == [1, 1]
    np.testing.assert_array_equal(np.stack(y), np.stack(images))
