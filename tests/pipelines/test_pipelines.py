"""Training and validation pipelines on real files: contract, decoding of every flavour,
normalization, parity with timm's eval transform, token provenance after mixing, sharding."""
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageOps

import jpeg_factory as jf
from mixpro_dali import MODES, MixConfig
from pipelines.decode import IMAGENET_MEAN, IMAGENET_STD
from pipelines.compat import shutdown_pipeline
from pipelines.loader import TrainLoader, ValLoader
from devices import needs_cuda

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
LO, HI = (0 - MEAN) / STD, (1 - MEAN) / STD          # normalized range of [0, 255] pixels
PLAIN = dict(auto_augment=None, re_prob=0.0, device="cpu", image_size=32)


def to_pixels(image):
    """(..., 3, H, W) normalized -> [0, 255] float."""
    return (image.float() * STD + MEAN) * 255


def colour_index(pixels):
    """Index of an indexed image (jf.indexed_images) from its mean R, G values."""
    r, g = pixels[0].mean().item(), pixels[1].mean().item()
    return int(round((g - 5) / 10)) * 25 + int(round((r - 5) / 10))


def test_train_batch_contract_full_recipe(flavour_tree):
    cfg = MixConfig.preset("mixpro", image_size=32, patch_size=8, mask_patch=16, seed=1)
    loader = TrainLoader(flavour_tree.root, batch_size=8, image_size=32, mix=cfg, device="cpu")
    assert len(loader) == 3 and loader.num_samples == 24
    modes = set()
    for batch in loader:
        assert set(batch) == {"image", "label_a", "label_b", "lam", "token_mask", "mode"}
        assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
        assert torch.isfinite(batch["image"]).all() and batch["image"].std() > 0.1
        for key in ("label_a", "label_b"):
            assert batch[key].shape == (8,) and batch[key].dtype == torch.int64
            assert set(batch[key].tolist()) <= {0, 1, 2}
        assert batch["lam"].shape == (8,) and batch["lam"].dtype == torch.float32
        assert ((batch["lam"] >= 0) & (batch["lam"] <= 1)).all()
        assert batch["token_mask"].shape == (8, 4, 4) and batch["token_mask"].dtype == torch.uint8
        assert batch["mode"].dtype == torch.int32 and len(set(batch["mode"].tolist())) == 1
        modes.add(batch["mode"][0].item())
        assert batch["image"].device.type == "cpu"
    assert modes <= set(MODES.values())


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_every_flavour_decodes_within_range(flavour_tree, dtype, torch_dtype):
    loader = TrainLoader(flavour_tree.root, batch_size=12, dtype=dtype, seed=3, **PLAIN)
    seen = 0
    for batch in loader:
        image = batch["image"]
        assert image.dtype == torch_dtype and image.shape == (12, 3, 32, 32)
        tol = 0.02
        assert (image.float() >= LO - tol).all() and (image.float() <= HI + tol).all()
        seen += len(image)
    assert seen == 24


def test_val_normalization_is_exact_on_uniform_images(indexed):
    loader = ValLoader(indexed.list, batch_size=8, image_size=32, device="cpu")
    for batch in loader:
        for image, label in zip(batch["image"], batch["label"].tolist()):
            i = label
            want = torch.tensor([10 * (i % 25) + 5, 10 * (i // 25) + 5, 128.0]).view(3, 1, 1)
            want = (want / 255 - MEAN) / STD
            assert (image - want).abs().max() < 1.5 / 255 / 0.224   # JPEG: +-1 level


def test_val_matches_timm_eval_transform(flavour_tree):
    from timm.data import create_transform

    ref = create_transform(input_size=(3, 32, 32), is_training=False, interpolation="bicubic",
                           crop_pct=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    loader = ValLoader(flavour_tree.root, batch_size=24, image_size=32, crop_pct=0.875,
                       device="cpu")
    (batch,) = list(loader)
    assert batch["label"].tolist() == flavour_tree.labels
    for image, path in zip(batch["image"], flavour_tree.files):
        # DALI shows EXIF-rotated files as displayed; PIL's loader (torchvision, timm) does not
        want = ref(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
        # same decoder output; resizers differ slightly (DALI's antialiased cubic vs PIL's)
        assert (image - want).abs().mean() < 0.05, path


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = 255                               # left half white, right half black
    jf.write(tmp_path / "c" / "r.jpg", jf.encode(arr, "exif_rotated"))
    (batch,) = list(ValLoader(tmp_path, batch_size=1, image_size=32, crop_pct=1.0, device="cpu"))
    px = to_pixels(batch["image"][0]).mean(0)       # displayed: rotated 90 CW -> white on top
    assert px[:12].mean() > 200 and px[-12:].mean() < 50


@pytest.mark.parametrize("probs", [{"maskmix": 1.0}, {"cutmix": 1.0}, {"mixup": 1.0}])
def test_mixed_tokens_come_from_the_labelled_images(indexed, probs):
    cfg = MixConfig(image_size=32, patch_size=8, mask_patch=16, probs=probs, seed=5, partner="perm")
    loader = TrainLoader(indexed.list, batch_size=6, mix=cfg, **PLAIN)
    for batch in loader:
        for s in range(6):
            px = to_pixels(batch["image"][s])                          # (3, 32, 32)
            a, b = batch["label_a"][s].item(), batch["label_b"][s].item()
            if probs.get("mixup"):
                lam = batch["lam"][s].item()
                ca = torch.tensor([10 * (a % 25) + 5, 10 * (a // 25) + 5.0])
                cb = torch.tensor([10 * (b % 25) + 5, 10 * (b // 25) + 5.0])
                got = px[:2].mean((1, 2))
                assert torch.allclose(got, lam * ca + (1 - lam) * cb, atol=2.0)
                continue
            mask = batch["token_mask"][s]
            assert batch["lam"][s].item() == pytest.approx(mask.float().mean().item())
            for ty in range(4):
                for tx in range(4):
                    tok = px[:, 8 * ty:8 * ty + 8, 8 * tx:8 * tx + 8]
                    assert colour_index(tok) == (a if mask[ty, tx] else b)


def run_epochs(make, shards, epochs):
    """labels seen per (epoch, shard) from `make(shard_id)` loaders."""
    loaders = [make(s) for s in range(shards)]
    return [[torch.cat([b["label_a"] if "label_a" in b else b["label"] for b in ld]).tolist()
             for ld in loaders] for _ in range(epochs)]


@pytest.mark.parametrize("kind", ["list", "wds"])
@pytest.mark.parametrize("shards,batch", [(2, 4), (3, 2)])
def test_train_shards_partition_every_epoch(indexed, kind, shards, batch):
    src = indexed.list if kind == "list" else indexed.wds

    def make(s):
        return TrainLoader(src, batch_size=batch, shard_id=s, num_shards=shards, seed=4, **PLAIN)

    n_batches = (indexed.n // shards) // batch
    seen = run_epochs(make, shards, 3)
    for epoch in seen:
        flat = [x for shard in epoch for x in shard]
        assert [len(s) for s in epoch] == [n_batches * batch] * shards   # drop last, equal on all ranks
        assert len(set(flat)) == len(flat)                               # nothing twice in an epoch
        assert set(flat) <= set(range(indexed.n))
    assert seen[0] != seen[1] != seen[2]                                 # reshuffled every epoch


@pytest.mark.parametrize("kind", ["list", "wds"])
@pytest.mark.parametrize("shards,batch", [(1, 5), (2, 5), (3, 4), (2, 11)])
def test_val_counts_every_sample_exactly_once(indexed, kind, shards, batch):
    src = indexed.list if kind == "list" else indexed.wds
    loaders = [ValLoader(src, batch_size=batch, image_size=32, shard_id=s, num_shards=shards,
                         device="cpu") for s in range(shards)]
    for _ in range(2):                                                   # and again next epoch
        labels = []
        for ld in loaders:
            got = [b["label"] for b in ld]
            assert len(got) == len(ld)
            labels += torch.cat(got).tolist()
        assert sorted(labels) == list(range(indexed.n))
    assert sum(ld.num_shard_samples for ld in loaders) == indexed.n


def test_images_match_their_labels_in_validation(indexed):
    for batch in ValLoader(indexed.wds, batch_size=7, image_size=32, device="cpu"):
        for image, label in zip(batch["image"], batch["label"].tolist()):
            assert colour_index(to_pixels(image)) == label


def test_same_seed_same_batches_other_seed_other_batches(flavour_tree):
    cfg = MixConfig.preset("mixpro", image_size=32, patch_size=8, mask_patch=16, seed=0)

    def first(seed):
        return [b for _, b in zip(range(2), TrainLoader(flavour_tree.root, batch_size=8, mix=cfg,
                                                        seed=seed, **PLAIN))]

    a, b, c = first(0), first(0), first(1)
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(a[0]["image"], c[0]["image"])


def test_fashion_mnist_tree_when_available(tmp_path):
    raw = jf.fashion_mnist_raw()
    if raw is None:
        pytest.skip("Fashion-MNIST IDX files not on this machine")
    files, labels = jf.fashion_mnist_tree(tmp_path, raw, per_class=4)
    (batch,) = list(ValLoader(tmp_path, batch_size=40, image_size=32, crop_pct=1.0, device="cpu"))
    assert batch["label"].tolist() == labels and batch["image"].shape == (40, 3, 32, 32)
    px = to_pixels(batch["image"])
    assert torch.allclose(px[:, 0], px[:, 1], atol=1) and torch.allclose(px[:, 1], px[:, 2], atol=1)
    train = TrainLoader(tmp_path, batch_size=8, **PLAIN)
    assert sum(len(b["label_a"]) for b in train) == 40


@needs_cuda
def test_gpu_matches_cpu_validation(flavour_tree):
    cpu = list(ValLoader(flavour_tree.root, batch_size=24, image_size=32, device="cpu"))[0]
    gpu = list(ValLoader(flavour_tree.root, batch_size=24, image_size=32, device="cuda"))[0]
    assert gpu["image"].is_cuda and gpu["label"].is_cuda
    assert torch.equal(cpu["label"], gpu["label"].cpu())
    # nvJPEG and libjpeg-turbo differ by a level or two (IDCT, chroma upsampling)
    assert (cpu["image"] - gpu["image"].cpu()).abs().mean() < 0.05


@needs_cuda
def test_gpu_training_batches_live_on_the_gpu(flavour_tree):
    cfg = MixConfig.preset("mixpro", image_size=32, patch_size=8, mask_patch=16, seed=1)
    loader = TrainLoader(flavour_tree.root, batch_size=8, image_size=32, mix=cfg, device="cuda",
                         hw_decoder_load=0.5)
    for batch in loader:
        assert all(v.is_cuda for v in batch.values())
        assert batch["image"].shape == (8, 3, 32, 32)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_cpu_resize_kernel_matches_dali_resize_and_pil(flavour_tree, interpolation):
    """The CPU pipelines resize with torch; the GPU ones with DALI's fn.resize: same filter."""
    from nvidia.dali import fn, pipeline_def, types

    from pipelines.decode import resize_shorter, resize_train

    @pipeline_def(batch_size=12, num_threads=2, device_id=None, seed=0)
    def pipe():
        enc, _ = fn.readers.file(files=flavour_tree.files[:12])
        img = fn.decoders.image(enc, output_type=types.RGB)
        return (img, resize_train(img, (40, 24), interpolation, backend="cpu", threads=2),
                resize_train(img, (40, 24), interpolation, backend="gpu"),
                resize_shorter(img, 30, interpolation, backend="cpu", threads=2))

    p = pipe()
    p.build()
    src, torch_out, dali_out, shorter = (list(map(np.array, o)) for o in p.run())
    shutdown_pipeline(p)
    mode = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
    for s, t, d, sh in zip(src, torch_out, dali_out, shorter):
        pil = np.array(Image.fromarray(s).resize((24, 40), mode)).astype(int)
        assert t.shape == d.shape == (40, 24, 3)
        assert np.abs(t.astype(int) - pil).mean() < 0.5
        assert np.abs(d.astype(int) - pil).mean() < 2.0
        h, w = s.shape[:2]
        ref = torchvision.transforms.Resize(30)(Image.fromarray(s)).size   # (W, H)
        assert sh.shape[:2] == (ref[1], ref[0]), (h, w)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_torch_resize_kernel_writes_what_interpolate_computes(interpolation):
    """TorchResize writes straight into the HWC output; it must equal torch's interpolate."""
    from torch.utils.dlpack import to_dlpack

    from pipelines.decode import TorchResize

    rng = np.random.default_rng(0)
    samples = [torch.from_numpy(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)),
               torch.from_numpy(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8))]
    for kernel in (TorchResize(interpolation, size=(24, 30)), TorchResize(interpolation, shorter=12)):
        for x, got in zip(samples, kernel([to_dlpack(s) for s in samples])):
            got = torch.from_dlpack(got)
            nchw = x.permute(2, 0, 1).unsqueeze(0)
            want = torch.nn.functional.interpolate(
                nchw, size=kernel.out_size(*x.shape[:2]), mode=interpolation,
                antialias=interpolation != "nearest")[0].permute(1, 2, 0)
            assert got.is_contiguous() and torch.equal(got, want)
