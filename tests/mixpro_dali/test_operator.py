"""The MaskMix operator inside real DALI pipelines (CPU here; GPU variants auto-skip)."""
import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types

from mixpro_dali import MODES, MixConfig, apply_mix, mix, sample_mix
from mixpro_dali.operator import batch_view
from pipelines.compat import shutdown_pipeline
from devices import DALI_DEVICES
from op_count import CountOps

B = 8


_BUILT = []


@pytest.fixture(autouse=True)
def _shutdown_pipelines():
    """Shut pipelines down deterministically: a pipeline with a python operator that is
    garbage-collected while prefetching can deadlock inside that operator."""
    yield
    while _BUILT:
        shutdown_pipeline(_BUILT.pop())


def source_images(size, layout, dtype, seed=0, batch=B, noise=False):
    """Batch k: image i is constant 10*(i+1) + k, with a random label; pixels encode the index.
    noise: random pixels instead (for bitwise comparisons of the blend)."""
    h, w = size

    def gen(info):
        k = info.iteration
        ids = (np.arange(batch) + 1) * 10 + k % 10
        shape = (batch, h, w, 3) if layout == "HWC" else (batch, 3, h, w)
        rng = np.random.default_rng(seed + k)
        if noise:
            imgs = (rng.random(shape) * 255).astype(dtype)
        else:
            imgs = np.broadcast_to(ids.reshape(batch, 1, 1, 1), shape).astype(dtype)
        labels = rng.integers(0, 1000, (batch, 1)).astype(np.int32)
        return list(imgs), list(labels)

    return gen


def build(cfg, *, layout="HWC", dtype=np.uint8, device="cpu", shard_id=0, start=0, batch=B,
          noise=False):
    ops = {}

    @pipeline_def(batch_size=batch, num_threads=1, device_id=0 if device == "gpu" else None, seed=1)
    def pipe():
        imgs, labels = fn.external_source(source_images(cfg.image_size, layout, dtype, batch=batch,
                                                        noise=noise), num_outputs=2,
                                          batch=True, batch_info=True, layout=[layout, ""])
        if device == "gpu":
            imgs = imgs.gpu()
        out = mix(imgs, labels, cfg, layout=layout, shard_id=shard_id)
        ops["op"] = out.operator
        return imgs, labels, out.images, out.labels_a, out.labels_b, out.lam, out.token_mask, out.mode

    p = pipe()
    _BUILT.append(p)
    ops["op"].set_batch_index(start)
    p.build()
    p._mix_op = ops["op"]
    return p


def run(p):
    outs = p.run()
    return [np.array((o.as_cpu() if hasattr(o, "as_cpu") else o).as_tensor()) for o in outs]


@pytest.mark.parametrize("device", DALI_DEVICES)
@pytest.mark.parametrize("layout,dtype", [("HWC", np.uint8), ("CHW", np.float32), ("CHW", np.float16)])
@pytest.mark.parametrize("partner", ["flip", "perm"])
def test_every_token_from_exactly_one_image(device, layout, dtype, partner):
    cfg = MixConfig(image_size=(48, 80), patch_size=8, mask_patch=24, partner=partner,
                    probs={"maskmix": 0.5, "cutmix": 0.5}, seed=2)
    p = build(cfg, layout=layout, dtype=dtype, device=device)
    for _ in range(4):
        x, labels, out, la, lb, lam, tmask, mode = run(p)
        assert out.dtype == dtype and out.shape == x.shape
        assert tmask.dtype == np.uint8 and tmask.shape == (B, 6, 10)
        assert lam.dtype == np.float32 and mode.dtype == np.int32 and (mode == mode[0]).all()
        assert mode[0] in (MODES["maskmix"], MODES["cutmix"])
        img = out[:, 0] if layout == "CHW" else out[..., 0]                       # (B, H, W)
        tokens = img.reshape(B, 6, 8, 10, 8).transpose(0, 1, 3, 2, 4)            # (B, h, w, 8, 8)
        assert (tokens == tokens[..., :1, :1]).all()                             # no split token
        ids = x.reshape(B, -1)[:, 0]
        val = tokens[..., 0, 0]
        own = val == ids[:, None, None]
        np.testing.assert_array_equal(own | (tmask == 0), True)
        # the partner's pixels identify the partner: labels_b must be that partner's label
        for i in range(B):
            foreign = val[i][tmask[i] == 0]
            if foreign.size:
                j = int(np.flatnonzero(ids == foreign[0])[0])
                assert (foreign == ids[j]).all() and lb[i] == labels[j]
        np.testing.assert_array_equal(la, labels)
        np.testing.assert_allclose(lam, tmask.reshape(B, -1).mean(1), rtol=0, atol=1e-7)
        # realized pixel share equals lam (images are distinct except self-pairs)
        share = (img == ids[:, None, None]).mean((1, 2))
        self_pair = np.array([lb[i] == la[i] for i in range(B)]).ravel()
        np.testing.assert_allclose(share[~self_pair], lam[~self_pair], atol=1e-7)


@pytest.mark.parametrize("device", DALI_DEVICES)
@pytest.mark.parametrize("layout,dtype", [("HWC", np.uint8), ("CHW", np.float16), ("CHW", np.float32)])
def test_operator_equals_plain_torch_kernel(device, layout, dtype):
    """Bitwise against `apply_mix` on every mode (mixpro-official: MaskMix, Mixup, CutMix) and on
    random pixels. Also guards the CPU operator's reused output buffer: with DALI's prefetching,
    batch k+1 is mixed before batch k is read, so aliased outputs would show up here."""
    cfg = MixConfig.preset("mixpro-official", image_size=(32, 48), patch_size=8, mask_patch=16, seed=5)
    p = build(cfg, device=device, shard_id=3, layout=layout, dtype=dtype, noise=True)
    seen = set()
    for k in range(10):
        x, labels, out, la, lb, lam, tmask, mode = run(p)
        ref = sample_mix(cfg, B, k, shard_id=3)
        seen.add(ref.mode)
        assert (mode == ref.mode).all() and out.dtype == dtype
        want = apply_mix(torch.from_numpy(x), ref, patch_size=8, layout=layout).numpy()
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(tmask, ref.token_mask.numpy())
        np.testing.assert_array_equal(lam, ref.lam.numpy())
        np.testing.assert_array_equal(la, labels)
        np.testing.assert_array_equal(lb, labels[ref.partner.numpy()])
    assert seen == {MODES["mixup"], MODES["cutmix"], MODES["maskmix"]}


def test_unmixed_batches_of_a_mixing_config_pass_through():
    cfg = MixConfig(image_size=16, patch_size=8, mask_patch=8, probs={"maskmix": 0.5}, seed=2)
    p = build(cfg, layout="CHW", dtype=np.float16, noise=True)
    modes = set()
    for k in range(8):
        x, labels, out, la, lb, lam, tmask, mode = run(p)
        modes.add(int(mode[0]))
        if mode[0] == MODES["none"]:
            np.testing.assert_array_equal(out, x)
            np.testing.assert_array_equal(lb, labels)
            assert (lam == 1).all() and (tmask == 1).all()
    assert modes == {MODES["none"], MODES["maskmix"]}


@pytest.mark.parametrize("mode", ["maskmix", "cutmix", "mixup"])
@pytest.mark.parametrize("layout,dtype", [("HWC", np.uint8), ("CHW", np.float16)])
def test_operator_ops_per_batch_do_not_grow_with_batch_size(mode, layout, dtype):
    """Non-view torch ops dispatched per batch by the draw and the mix call together, counted
    in a real pipeline: the same list at B=16 and B=64 (no per-sample loop)."""
    cfg = MixConfig(image_size=16, patch_size=4, mask_patch=8, probs={mode: 1.0}, partner="perm")
    seen = {}
    for batch in (16, 64):
        p = build(cfg, layout=layout, dtype=dtype, batch=batch)
        op = p._mix_op
        base, calls = type(op), []

        def counted(method):
            def f(self, *args):
                with CountOps() as c:
                    r = method(self, *args)
                calls.append((method.__name__, c.ops))
                return r
            return f

        op.__class__ = type("Counted", (base,), {"__call__": counted(base.__call__),
                                                 "draw": counted(base.draw)})
        for _ in range(3):
            run(p)
        per_batch = [ops for name, ops in calls if name == "__call__"]
        draws = [ops for name, ops in calls if name == "draw"]
        assert len(per_batch) >= 3 and len(draws) >= 3     # DALI prefetches ahead
        seen[batch] = (per_batch[-1], draws[-1])
    assert seen[16] == seen[64] and len(seen[16][0]) <= 10, seen


def test_batch_view_shares_back_to_back_samples_else_copies():
    x = torch.arange(4 * 6, dtype=torch.float16).view(4, 2, 3)
    v = batch_view(list(x.unbind(0)))
    assert v.data_ptr() == x.data_ptr() and torch.equal(v, x)
    apart = [torch.full((2, 3), float(i)) for i in range(4)]                # separate buffers
    s = batch_view(apart)
    assert torch.equal(s, torch.stack(apart)) and s.data_ptr() != apart[0].data_ptr()
    swapped = [x[1], x[0], x[2], x[3]]                                      # out of order
    assert torch.equal(batch_view(swapped), torch.stack(swapped))


def test_a_config_that_never_mixes_adds_no_operator():
    cfg = MixConfig(image_size=16, patch_size=8, mask_patch=8, probs={})
    p = build(cfg, layout="CHW", dtype=np.float32)
    for _ in range(3):
        x, labels, out, la, lb, lam, tmask, mode = run(p)
        np.testing.assert_array_equal(out, x)
        np.testing.assert_array_equal(lb, labels)
        assert lam.dtype == np.float32 and tmask.dtype == np.uint8 and mode.dtype == np.int32
        assert (lam == 1).all() and tmask.shape == (B, 2, 2) and (tmask == 1).all() and (mode == 0).all()
    assert p._mix_op.batch_index == 0                 # never called
    assert build(MixConfig(image_size=16, patch_size=8, mask_patch=8), layout="CHW",
                 dtype=np.float32)._mix_op.batch_index == 0


def test_mixup_output_is_the_blend():
    cfg = MixConfig(image_size=16, patch_size=8, mask_patch=8, probs={"mixup": 1.0}, seed=1)
    x, labels, out, la, lb, lam, tmask, mode = run(build(cfg))
    assert (mode == MODES["mixup"]).all() and (tmask == 1).all() and (lam == lam[0]).all()
    want = np.round(x * float(lam[0]) + x[::-1] * (1 - float(lam[0]))).astype(np.uint8)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(lb, labels[::-1])


def test_unmixed_batches_pass_through():
    cfg = MixConfig.preset("none", image_size=16, patch_size=8, mask_patch=8)
    for layout, dtype in (("HWC", np.uint8), ("CHW", np.float16)):
        x, labels, out, la, lb, lam, tmask, mode = run(build(cfg, layout=layout, dtype=dtype))
        np.testing.assert_array_equal(out, x)
        assert out.dtype == dtype and (mode == 0).all() and (lam == 1).all() and (tmask == 1).all()
        np.testing.assert_array_equal(lb, labels)


def test_same_seed_same_batches_and_shards_differ():
    cfg = MixConfig.preset("mixpro", image_size=32, patch_size=8, mask_patch=8, seed=4)
    a, b, c = build(cfg), build(cfg), build(cfg, shard_id=1)
    differs = False
    for _ in range(5):
        ra, rb, rc = run(a), run(b), run(c)
        for u, v in zip(ra, rb):
            np.testing.assert_array_equal(u, v)
        differs |= not (np.array_equal(ra[6], rc[6]) and ra[7][0] == rc[7][0])
    assert differs


def test_resume_from_batch_counter_reproduces_next_batches():
    cfg = MixConfig.preset("mixpro-official", image_size=32, patch_size=8, mask_patch=8, seed=8)
    full = build(cfg)
    batches = [run(full) for _ in range(5)]
    # a fresh pipeline whose source also resumes at batch 3 (external source: iteration is
    # the pipeline's own, so compare the mixing decisions, which depend only on the counter)
    resumed = build(cfg, start=3)
    r = run(resumed)
    np.testing.assert_array_equal(r[6], batches[3][6])
    np.testing.assert_array_equal(r[5], batches[3][5])
    assert r[7][0] == batches[3][7][0]


def test_wrong_image_size_names_the_setting():
    cfg16 = MixConfig(image_size=16, patch_size=8, mask_patch=8)

    @pipeline_def(batch_size=B, num_threads=1, device_id=None)
    def wrong():
        imgs, labels = fn.external_source(source_images((32, 32), "HWC", np.uint8), num_outputs=2,
                                          batch=True, batch_info=True)
        return mix(imgs, labels, cfg16).images

    p = wrong()
    _BUILT.append(p)
    p.build()
    with pytest.raises(RuntimeError, match=r"size 16x16 \(MixConfig.image_size\), got shape \(32, 32, 3\)"):
        p.run()


def test_mix_argument_errors():
    cfg = MixConfig(image_size=16, patch_size=8, mask_patch=8)

    def pipe(**kw):
        @pipeline_def(batch_size=2, num_threads=1, device_id=None)
        def p():
            imgs = fn.random.uniform(range=[0, 255], shape=[16, 16, 3], dtype=types.UINT8)
            labels = fn.random.uniform(range=[0, 9], shape=[1], dtype=types.INT32)
            return mix(imgs, labels, **kw).images

        return p()

    with pytest.raises(ValueError, match=r"layout must be one of \('HWC', 'CHW'\), got 'NHWC'"):
        pipe(config=cfg, layout="NHWC")
    with pytest.raises(ValueError, match=r"shard_id must be a non-negative int, got -1"):
        pipe(config=cfg, shard_id=-1)
    with pytest.raises(TypeError, match=r"config must be a MixConfig, got dict"):
        pipe(config={"image_size": 16})
    with pytest.raises(TypeError, match=r"images must be a DALI DataNode \(call mix inside a pipeline definition\), got ndarray"):
        mix(np.zeros((2, 16, 16, 3)), None, cfg)
    with pytest.raises(ValueError, match=r"batch index must be a non-negative int"):
        build(cfg, start=-3)


def test_draw_and_mix_run_unconverted_in_a_conditional_pipeline():
    """With enable_conditionals=True DALI's AutoGraph rewrites what the pipeline definition
    defines and calls; the operator's draw callback must run as plain Python (it once ran
    through `converted_call`, 20x slower). Checked from the stack, through `add_hook`."""
    import contextlib
    import inspect

    cfg = MixConfig(image_size=16, patch_size=4, mask_patch=8, probs={"maskmix": 1.0})
    held, converted = {}, {}

    @pipeline_def(batch_size=B, num_threads=1, device_id=None, seed=1, enable_conditionals=True)
    def pipe():
        imgs, labels = fn.external_source(source_images(cfg.image_size, "HWC", np.uint8),
                                          num_outputs=2, batch=True, batch_info=True,
                                          layout=["HWC", ""])
        out = mix(imgs, labels, cfg)
        held["op"] = out.operator
        return out.images, out.lam

    @contextlib.contextmanager
    def spy(name):
        converted[name] = converted.get(name, False) or any(
            "_autograph" in f.filename for f in inspect.stack(0))
        yield

    p = pipe()
    _BUILT.append(p)
    p.build()
    remove = held["op"].add_hook(spy)
    for _ in range(2):
        p.run()
    assert converted == {"draw": False, "mix": False}
    remove()
    assert held["op"]._hooks == []
