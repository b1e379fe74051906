"""Loaders: epochs and len, exact mid-epoch resume (DALI checkpoint + MaskMix counter), bad
input errors that name the file, exclusion, and argument errors."""
from pathlib import Path

import pytest
import torch

import jpeg_factory as jf
from mixpro_dali import MixConfig
from pipelines.badfiles import BadImageError
from pipelines.loader import TrainLoader, ValLoader, image_dtype, resolve_device
from pipelines.val_pipeline import normalize_dtype
from pipelines.scan import main as scan_main
from devices import HAS_CUDA, needs_cuda

PLAIN = dict(auto_augment=None, re_prob=0.0, device="cpu", image_size=32)
MIX = MixConfig(image_size=32, patch_size=8, mask_patch=16, seed=7,
                probs={"maskmix": 0.4, "cutmix": 0.3, "mixup": 0.3})


def take(loader, n):
    """The next n batches, crossing epoch boundaries (a new `for` pass per epoch)."""
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


def test_len_epochs_and_partial_passes(indexed):
    loader = TrainLoader(indexed.list, batch_size=4, mix=MIX, **PLAIN)
    assert len(loader) == 5 and loader.epoch_runs == 6          # 23 -> 5 full batches, 1 padded
    assert len(list(loader)) == 5 and loader.epoch == 1
    first = take(loader, 2)                                      # break after 2 of epoch 1
    assert loader.epoch == 1 and loader.batch_in_epoch == 2
    assert len(list(loader)) == 3 and loader.epoch == 2         # the rest of epoch 1
    labels = torch.cat([b["label_a"] for b in first]).tolist()
    assert len(set(labels)) == len(labels) == 8


@pytest.mark.parametrize("kind", ["list", "wds"])
@pytest.mark.parametrize("consumed", [3, 5, 7])                 # mid-epoch, at the tail, epoch 1
def test_resume_gives_the_identical_next_batches(indexed, kind, consumed):
    src = indexed.list if kind == "list" else indexed.wds
    make = lambda: TrainLoader(src, batch_size=4, mix=MIX, seed=2, shard_id=1, num_shards=2,  # noqa: E731
                               **{**PLAIN, "num_threads": 2})
    run = make()
    n = len(run)
    take(run, consumed)
    state = run.state_dict()
    assert state["runs"] >= consumed
    expect = take(run, 2 * n)                                    # crosses an epoch boundary
    fresh = make()
    fresh.load_state_dict(state)
    assert (fresh.epoch, fresh.batch_in_epoch) == (state["epoch"], state["batch_in_epoch"])
    assert_same(take(fresh, 2 * n), expect)


def test_resume_with_the_full_recipe(flavour_tree):
    cfg = MixConfig.preset("mixpro", image_size=32, patch_size=8, mask_patch=16, seed=3)
    run = TrainLoader(flavour_tree.root, batch_size=4, image_size=32, mix=cfg, device="cpu", seed=5)
    take(run, 4)
    state = run.state_dict()
    expect = take(run, 4)
    run.load_state_dict(state)                                   # same object, rebuilt
    assert_same(take(run, 4), expect)


def test_state_checks(indexed):
    loader = TrainLoader(indexed.list, batch_size=4, **PLAIN)
    state = loader.state_dict()
    other = TrainLoader(indexed.list, batch_size=2, **PLAIN)
    with pytest.raises(ValueError, match="batch_size=4 but this loader has batch_size=2"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="not a TrainLoader state"):
        loader.load_state_dict({"runs": 3})
    it = iter(loader)
    next(it)
    loader.load_state_dict(state)
    with pytest.raises(RuntimeError, match="load_state_dict.. was called during iteration"):
        next(it)


def broken_tree(root: Path, kind: str):
    files, _ = jf.class_tree(root, classes=2, per_class=10)
    bad = files[13]
    Path(bad).write_bytes(jf.bad_bytes(kind, Path(bad).read_bytes()))
    return bad


@pytest.mark.parametrize("kind", jf.BAD_KINDS)
@pytest.mark.parametrize("which", ["train", "val"])
def test_bad_file_error_names_the_file(tmp_path, kind, which):
    bad = broken_tree(tmp_path / "data", kind)
    loader = (TrainLoader(tmp_path / "data", batch_size=4, **PLAIN) if which == "train" else
              ValLoader(tmp_path / "data", batch_size=4, image_size=32, device="cpu"))
    with pytest.raises(BadImageError, match=r"cannot decode '.*img_003\.JPEG'.*pipelines\.scan") as err:
        for _ in range(2):
            list(loader)
    assert err.value.path == bad and err.value.reason


def test_bad_member_of_a_webdataset_shard_is_named(tmp_path):
    files, _ = jf.class_tree(tmp_path / "img", classes=1, per_class=6)
    Path(files[4]).write_bytes(jf.bad_bytes("header_only", Path(files[4]).read_bytes()))
    jf.webdataset(tmp_path / "wds", files, [0] * 6, per_shard=3)
    loader = ValLoader(tmp_path / "wds", batch_size=2, image_size=32, device="cpu")
    with pytest.raises(BadImageError, match=r"shard-001\.tar:\d+:000004\.jpg.*header incomplete"):
        list(loader)


def test_scan_then_exclude_trains_through(tmp_path, capsys):
    bad = broken_tree(tmp_path / "data", "text")
    listing = tmp_path / "bad.txt"
    assert scan_main([str(tmp_path / "data"), "-o", str(listing)]) == 1
    loader = TrainLoader(tmp_path / "data", batch_size=4, exclude=listing, **PLAIN)
    assert loader.num_samples == 19 and loader.source.excluded == 1
    assert sum(len(b["image"]) for b in loader) == 16
    val = ValLoader(tmp_path / "data", batch_size=4, image_size=32, device="cpu", exclude=[bad])
    assert sum(len(b["image"]) for b in val) == 19


def test_argument_errors(indexed, flavour_tree):
    with pytest.raises(ValueError, match="fewer than batch_size=16: no full batch"):
        TrainLoader(indexed.list, batch_size=16, num_shards=2, **PLAIN)
    with pytest.raises(ValueError, match=r"shard_id must be an int in \[0, num_shards=2\), got 2"):
        TrainLoader(indexed.list, shard_id=2, num_shards=2, **PLAIN)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        ValLoader(indexed.list, batch_size=0, device="cpu")
    with pytest.raises(ValueError, match="interpolation must be one of"):
        TrainLoader(indexed.list, batch_size=4, **{**PLAIN, "interpolation": "cubic"})
    with pytest.raises(ValueError, match="dtype must be one of"):
        ValLoader(indexed.list, batch_size=4, device="cpu", dtype="int8")
    with pytest.raises(ValueError, match=r"scale must satisfy 0 < min <= max <= 1, got \(0.5, 2\)"):
        TrainLoader(indexed.list, batch_size=4, scale=(0.5, 2), **PLAIN)
    with pytest.raises(ValueError, match=r"mix config image_size \(64, 64\) must equal the training image_size \(32, 32\)"):
        TrainLoader(indexed.list, batch_size=4, mix=MixConfig(image_size=64), **PLAIN)
    with pytest.raises(ValueError, match="crop_pct must be in"):
        ValLoader(indexed.list, batch_size=4, device="cpu", crop_pct=1.5)
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        resolve_device("tpu")
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            resolve_device("cuda")
        assert resolve_device("auto") == (torch.device("cpu"), "cpu", None)


def test_host_buffers_are_reused_but_never_under_a_held_batch(indexed):
    loader = TrainLoader(indexed.list, batch_size=4, mix=MIX, **PLAIN)
    held = take(loader, 10)                     # 4 pooled buffers, then fresh tensors
    assert len({b["image"].data_ptr() for b in held}) == 10
    del held
    ptrs = []
    for _ in range(2):
        for batch in loader:
            ptrs.append(batch["image"].data_ptr())
            del batch
    assert len(set(ptrs)) <= 4 < len(ptrs)


def test_close_stops_the_pipeline(indexed):
    with TrainLoader(indexed.list, batch_size=4, **PLAIN) as loader:
        next(iter(loader))
    with pytest.raises(RuntimeError, match="this loader was closed"):
        next(iter(loader))


def test_a_loader_left_open_at_exit_exits_quietly(indexed, tmp_path):
    """A script that never closes its loaders must exit without 'Exception ignored in ...
    __del__': a loader kept alive by a reference cycle is finalized after imports stop working
    (it printed an ImportError traceback from the pipeline shutdown)."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "open_at_exit.py"
    script.write_text(textwrap.dedent(f"""
        from pipelines.loader import TrainLoader, ValLoader
        train = TrainLoader({str(indexed.list)!r}, batch_size=4, auto_augment=None, re_prob=0.0,
                            device="cpu", image_size=32)
        val = ValLoader({str(indexed.list)!r}, batch_size=4, device="cpu", image_size=32)
        next(iter(train)), next(iter(val))
        cycle = {{"loaders": (train, val)}}
        cycle["self"] = cycle      # reachable only through a cycle: collected at the very end
        del train, val
        print("ran")
    """))
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)},
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ran", out.stderr[-2000:]
    assert "Exception ignored" not in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_image_dtype_follows_amp_on_the_gpu_only():
    assert [image_dtype(a, "cuda") for a in ("bf16", "fp16", "none")] == [
        "bfloat16", "float16", "float32"]
    assert {image_dtype(a, torch.device("cpu")) for a in ("bf16", "fp16", "none")} == {"float32"}
    with pytest.raises(ValueError, match=r"amp must be one of \('bf16', 'fp16', 'none'\), got 'fp8'"):
        image_dtype("fp8", "cuda")
    # the GPU's normalize writes half outputs as float16; the CPU's as asked (bf16: float32)
    assert [normalize_dtype("gpu", d) for d in ("float32", "float16", "bfloat16")] == [
        "float32", "float16", "float16"]
    assert [normalize_dtype("cpu", d) for d in ("float32", "float16", "bfloat16")] == [
        "float32", "float16", "bfloat16"]


def test_cpu_loaders_run_without_a_stream_and_give_the_asked_dtype(indexed):
    with TrainLoader(indexed.list, batch_size=4, dtype="bfloat16", **PLAIN) as train, \
            ValLoader(indexed.list, batch_size=4, image_size=32, device="cpu",
                      dtype="bfloat16") as val:
        assert train._stream() is None and val._stream() is None
        t, v = next(iter(train)), next(iter(val))
    assert t["image"].dtype == v["image"].dtype == torch.bfloat16
    with ValLoader(indexed.list, batch_size=4, image_size=32, device="cpu") as val32:
        ref = next(iter(val32))["image"]
    assert torch.equal(v["image"], ref.to(torch.bfloat16))     # one rounding of the float32


@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpu_loaders_give_the_amp_dtype_on_the_device(indexed, dtype):
    kw = dict(batch_size=4, image_size=32, device="cuda", dtype=dtype)
    with TrainLoader(indexed.list, auto_augment=None, re_prob=0.0, mix=MIX, **kw) as train, \
            ValLoader(indexed.list, **kw) as val:
        for batch in (next(iter(train)), next(iter(val))):
            img = batch["image"]
            assert img.dtype == getattr(torch, dtype) and img.device.type == "cuda"
            assert torch.isfinite(img.float()).all() and img.float().abs().max() < 10
