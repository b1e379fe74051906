"""pipelines.erasing vs timm 1.0.31 RandomErasing: erase rate, box distribution (two-sample tests
against timm itself), fill statistics, untouched pixels, dtype/layout, determinism."""
import random

import numpy as np
import pytest
import torch
from scipy import stats

from nvidia.dali import fn, pipeline_def
from pipelines.erasing import random_erasing
from pipelines.compat import shutdown_pipeline
from timm.data.random_erasing import RandomErasing
from dali_checks import assert_checkpoint_resumes_exactly
from devices import needs_cuda

H, W = 24, 40


def run(images, augment, *, layout="CHW", batches=1, seed=0, conditionals=True, gpu=False):
    @pipeline_def(batch_size=len(images), num_threads=2, device_id=0 if gpu else None, seed=seed,
                  enable_conditionals=conditionals)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout=layout)
        return augment(x.gpu() if gpu else x)

    p = pipe()
    p.build()
    outs = [np.array(t.as_cpu() if gpu else t) for _ in range(batches) for t in p.run()[0]]
    shutdown_pipeline(p)   # DALI's teardown, deterministic (its __del__ does the same)
    return outs


def erased_masks(outs, value=5.0):
    return [(o != value).any(axis=0) for o in outs]  # (H, W) per CHW sample


def timm_masks(n, **kw):
    random.seed(0)
    torch.manual_seed(0)
    erase = RandomErasing(device="cpu", **kw)
    return [(erase(torch.full((3, H, W), 5.0)).numpy() != 5.0).any(axis=0) for _ in range(n)]


def box_stats(masks):
    """(erased?, erased pixels, log(h / w) of the bounding box) for every mask."""
    hit = np.array([m.any() for m in masks])
    area = np.array([m.sum() for m in masks if m.any()])
    aspect = np.array([np.log(m.any(1).sum() / m.any(0).sum()) for m in masks if m.any()])
    return hit, area, aspect


@pytest.mark.parametrize("count, prob", [(1, 0.25), (3, 0.6)])
def test_erase_rate_and_boxes_match_timm(count, prob):
    images = [np.full((3, H, W), 5.0, np.float32)] * 500
    outs = run(images, lambda x: random_erasing(x, prob=prob, mode="const", count=count, seed=3),
               batches=4)
    ours = box_stats(erased_masks(outs))
    theirs = box_stats(timm_masks(2000, probability=prob, mode="const", max_count=count))
    table = [[ours[0].sum(), (~ours[0]).sum()], [theirs[0].sum(), (~theirs[0]).sum()]]
    assert stats.chi2_contingency(table).pvalue > 1e-4
    assert abs(ours[0].mean() - prob) < 4 * np.sqrt(prob * (1 - prob) / 2000)
    assert stats.ks_2samp(ours[1], theirs[1]).pvalue > 1e-3  # erased pixels per image
    if count == 1:
        assert stats.ks_2samp(ours[2], theirs[2]).pvalue > 1e-3  # box aspect


def test_single_box_is_a_rectangle_within_area_bounds():
    min_area, max_area = 0.05, 0.2
    images = [np.full((3, H, W), 5.0, np.float32)] * 400
    outs = run(images, lambda x: random_erasing(x, prob=1.0, mode="const", min_area=min_area,
                                                max_area=max_area, min_aspect=0.5))
    for out, mask in zip(outs, erased_masks(outs)):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        h, w = len(rows), len(cols)
        assert mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and mask.sum() == h * w
        assert (h - 0.5) * (w - 0.5) <= max_area * H * W <= H * W  # h, w are rounded
        assert (h + 0.5) * (w + 0.5) >= min_area * H * W
        assert 0.5 - 1e-6 <= (h + 0.5) / (w - 0.5) and (h - 0.5) / (w + 0.5) <= 2 + 1e-6
        assert (out[:, mask] == 0).all()  # const mode: 0 in every channel


@pytest.mark.parametrize("kernels", ["torch", "dali"])
@pytest.mark.parametrize("layout", ["CHW", "HWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_pixel_mode_noise_inside_and_nothing_outside(layout, dtype, kernels):
    rng = np.random.default_rng(0)
    images = [rng.uniform(3, 4, (3, H, W)).astype(dtype) for _ in range(64)]
    if layout == "HWC":
        images = [np.ascontiguousarray(i.transpose(1, 2, 0)) for i in images]
    outs = run(images, lambda x: random_erasing(x, prob=1.0, layout=layout, kernels=kernels),
               layout=layout)
    noise = []
    for image, out in zip(images, outs):
        assert out.dtype == dtype and out.shape == image.shape
        chw_in, chw_out = (image, out) if layout == "CHW" else (
            image.transpose(2, 0, 1), out.transpose(2, 0, 1))
        changed = (chw_in != chw_out).any(axis=0)
        rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
        assert changed[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # one full box
        assert np.array_equal(chw_in[:, ~changed], chw_out[:, ~changed])  # the rest untouched
        box = chw_out[:, changed].astype(np.float64)  # (3, pixels)
        assert box.std(axis=1).min() > 0.5  # per pixel, not per channel
        noise.append(box.ravel())
    noise = np.concatenate(noise)
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02
    assert stats.kstest(noise[:20000], "norm").pvalue > 1e-3


def test_rand_mode_one_normal_color_per_channel():
    images = [np.full((3, H, W), 5.0, np.float32)] * 300
    outs = run(images, lambda x: random_erasing(x, prob=1.0, mode="rand", seed=1))
    colors = []
    for out, mask in zip(outs, erased_masks(outs)):
        box = out[:, mask]  # (3, pixels)
        assert (box == box[:, :1]).all()
        colors.append(box[:, 0])
    colors = np.array(colors)  # (300, 3)
    assert stats.kstest(colors.ravel(), "norm").pvalue > 1e-3
    assert abs(np.corrcoef(colors[:, 0], colors[:, 1])[0, 1]) < 0.2  # channels independent


def test_deterministic_given_seeds():
    rng = np.random.default_rng(1)
    images = [rng.normal(size=(3, H, W)).astype(np.float32) for _ in range(32)]
    a = run(images, lambda x: random_erasing(x, prob=0.5, count=2), seed=4, batches=2)
    b = run(images, lambda x: random_erasing(x, prob=0.5, count=2), seed=4, batches=2)
    c = run(images, lambda x: random_erasing(x, prob=0.5, count=2, seed=9), seed=5, batches=2)
    d = run(images, lambda x: random_erasing(x, prob=0.5, count=2, seed=9), seed=6, batches=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(np.array_equal(x, y) for x, y in zip(c, d))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_prob_zero_is_identity():
    images = [np.random.default_rng(2).normal(size=(3, H, W)).astype(np.float32)] * 8
    outs = run(images, lambda x: random_erasing(x, prob=0.0))
    assert all(np.array_equal(i, o) for i, o in zip(images, outs))


@pytest.mark.parametrize("kwargs, message", [
    (dict(prob=1.5), r"prob must be in \[0, 1\], got 1.5"),
    (dict(mode="noise"), r"mode must be one of \('pixel', 'rand', 'const'\), got 'noise'"),
    (dict(min_area=0.5, max_area=0.2), "need 0 < min_area <= max_area <= 1"),
    (dict(min_area=0.0), "need 0 < min_area <= max_area <= 1"),
    (dict(min_aspect=-1.0), "need 0 < min_aspect <= max_aspect"),
    (dict(min_aspect=2.0, max_aspect=1.0), "need 0 < min_aspect <= max_aspect"),
    (dict(count=0), "count must be an integer >= 1, got 0"),
    (dict(count=1.5), "count must be an integer >= 1, got 1.5"),
    (dict(layout="NCHW"), "layout must be 'CHW' or 'HWC', got 'NCHW'"),
])
def test_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        random_erasing(None, **kwargs)


def test_needs_a_data_node_and_conditionals():
    with pytest.raises(TypeError, match="images must be a DALI DataNode"):
        random_erasing(np.zeros((3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="enable_conditionals=True"):
        run([np.zeros((3, 4, 4), np.float32)], random_erasing, conditionals=False)


@pytest.mark.filterwarnings("ignore:Checkpointing enabled")
@pytest.mark.parametrize("kernels", ["torch", "dali"])
def test_checkpoint_resume_is_exact(kernels):
    images = [np.random.default_rng(3).normal(size=(3, H, W)).astype(np.float32)] * 16

    @pipeline_def(batch_size=16, num_threads=2, device_id=None, seed=5,
                  enable_conditionals=True, enable_checkpointing=True)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="CHW")
        return random_erasing(x, prob=0.5, count=2, kernels=kernels)

    assert_checkpoint_resumes_exactly(pipe)


def test_torch_and_dali_kernels_erase_the_same_boxes():
    """The kernels only paint: which images, how many boxes and where are DALI's draws."""
    images = [np.full((3, H, W), 5.0, np.float32)] * 64
    masks = {k: erased_masks(run(images, lambda x: random_erasing(
        x, prob=0.5, count=3, seed=8, kernels=k), seed=2, batches=2)) for k in ("torch", "dali")}
    assert all(np.array_equal(a, b) for a, b in zip(masks["torch"], masks["dali"]))
    assert 0 < sum(m.any() for m in masks["torch"]) < 128


def test_kernel_choice_errors():
    with pytest.raises(ValueError, match="kernels must be one of"):
        random_erasing(None, kernels="cuda")


def test_torch_kernels_refuse_gpu_images():
    """Checked while the graph is traced, so it needs no GPU."""
    @pipeline_def(batch_size=2, num_threads=1, device_id=None, enable_conditionals=True)
    def pipe():
        x = fn.external_source(source=lambda: [np.zeros((3, H, W), np.float32)] * 2, batch=True,
                               layout="CHW")
        return random_erasing(x.gpu(), kernels="torch")

    with pytest.raises(ValueError, match="kernels='torch' runs on cpu images only"):
        pipe()


@needs_cuda
@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_gpu_erasing_matches_the_cpu_boxes(mode, dtype):
    """DALI's GPU erase has no float16: the gpu path erases as float32 and casts back."""
    images = [np.full((3, H, W), 5.0, dtype)] * 16
    erase = lambda x: random_erasing(x, prob=0.5, mode=mode, count=2, seed=3, kernels="dali")  # noqa: E731
    gpu, cpu = run(images, erase, gpu=True), run(images, erase)
    assert all(g.dtype == dtype and g.shape == (3, H, W) for g in gpu)
    assert [m.tolist() for m in erased_masks(gpu)] == [m.tolist() for m in erased_masks(cpu)]
    if mode == "const":
        assert all(np.array_equal(g, c) for g, c in zip(gpu, cpu))
