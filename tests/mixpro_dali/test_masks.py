"""Properties of the MaskMix/CutMix/Mixup kernels (plain torch, no DALI)."""
import numpy as np
import pytest
import torch
from scipy import stats

from op_count import CountOps

from mixpro_dali import (MODES, MixConfig, apply_mix, area_lambda, mix_samples, sample_mix,
                         stage_params)
from mixpro_dali.masks import cells_to_tokens
from devices import needs_cuda

SIZES = [  # (image_size, patch, cell): dividing and non-dividing cells, non-square images
    ((224, 224), 16, 64), ((224, 224), 16, 32), ((224, 224), 14, 56), ((32, 48), 4, 12),
    ((64, 48), 8, 24), ((224, 224), 16, 112), ((96, 160), 16, 48),
]


def slow_token_mask(cells: np.ndarray, cell: int, patch: int, hw: tuple[int, int]) -> np.ndarray:
    """Obvious reference: token (r, c) belongs to cell (r*patch // cell, c*patch // cell)."""
    b = cells.shape[0]
    h, w = hw[0] // patch, hw[1] // patch
    out = np.zeros((b, h, w), np.uint8)
    for i in range(b):
        for r in range(h):
            for c in range(w):
                out[i, r, c] = cells[i, r * patch // cell, c * patch // cell]
    return out


@pytest.mark.parametrize("size,patch,cell", SIZES)
def test_cells_to_tokens_matches_reference(size, patch, cell):
    cfg = MixConfig(image_size=size, patch_size=patch, mask_patch=cell)
    gh, gw = cfg.cell_grid
    cells = torch.randint(0, 2, (5, gh, gw), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fast = cells_to_tokens(cells, cell // patch, cfg.token_grid)
    assert fast.shape == (5, *cfg.token_grid)
    np.testing.assert_array_equal(fast.numpy(), slow_token_mask(cells.numpy(), cell, patch, size))


@pytest.mark.parametrize("size,patch,cell", SIZES)
@pytest.mark.parametrize("rounding", ["floor", "ceil"])
def test_maskmix_counts_and_exact_lambda(size, patch, cell, rounding):
    cfg = MixConfig.preset("maskmix", image_size=size, patch_size=patch, mask_patch=cell,
                           rounding=rounding, per_sample_ratio=True, seed=1)
    gh, gw = cfg.cell_grid
    for k in range(20):
        p = sample_mix(cfg, 8, k)
        assert p.mode == MODES["maskmix"]
        assert p.token_mask.dtype == torch.uint8 and p.token_mask.shape == (8, *cfg.token_grid)
        # lam is the exact token share, never n / S
        torch.testing.assert_close(p.lam, p.token_mask.float().mean((1, 2)))
        # every token mask is a union of whole cells: recover the cell mask from top-left tokens
        cells = p.token_mask[:, :: cell // patch, :: cell // patch]
        assert cells.shape == (8, gh, gw)
        torch.testing.assert_close(cells_to_tokens(cells, cell // patch, cfg.token_grid), p.token_mask)
        assert ((p.lam >= 0) & (p.lam <= 1)).all()


@pytest.mark.parametrize("rounding", ["floor", "ceil"])
@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0])
def test_cell_count_distribution_follows_beta(rounding, beta):
    """n = floor/ceil(S * tau), tau ~ Beta(beta, beta): chi-square over 4000 batches."""
    cfg = MixConfig.preset("maskmix", image_size=64, patch_size=16, mask_patch=16,
                           rounding=rounding, beta=beta, seed=7)  # S = 16 cells
    s = 16
    counts = np.array([int(sample_mix(cfg, 2, k).token_mask[0].sum()) for k in range(4000)])
    edges = np.arange(s + 1) / s
    cdf = stats.beta.cdf(edges, beta, beta)
    probs = np.diff(cdf)  # P(floor(S tau) = k), k = 0..S-1
    ks = np.arange(s) if rounding == "floor" else np.arange(1, s + 1)
    observed = np.array([(counts == k).sum() for k in ks])
    assert observed.sum() == len(counts)  # nothing outside the support
    _, pval = stats.chisquare(observed, probs * len(counts))
    assert pval > 1e-4


def test_one_tau_per_batch_but_own_layout_per_sample():
    cfg = MixConfig.preset("maskmix", image_size=64, patch_size=16, mask_patch=16, seed=0)
    for k in range(30):
        p = sample_mix(cfg, 16, k)
        n = p.token_mask.flatten(1).sum(1)
        assert (n == n[0]).all()  # same count (divisible grid -> same lam)
        if 2 <= n[0] <= 14:
            layouts = {tuple(m.flatten().tolist()) for m in p.token_mask}
            assert len(layouts) >= 12  # C(16, n) >= 120 choices: collisions are rare


def test_per_sample_ratio_varies_counts():
    cfg = MixConfig.preset("maskmix", image_size=64, patch_size=16, mask_patch=16, per_sample_ratio=True)
    n = sample_mix(cfg, 64, 0).token_mask.flatten(1).sum(1)
    assert len(set(n.tolist())) > 5


def test_cell_choice_is_uniform_over_positions():
    cfg = MixConfig.preset("maskmix", image_size=64, patch_size=16, mask_patch=16, seed=2)
    total = sum(sample_mix(cfg, 8, k).token_mask.sum(0).flatten().double() for k in range(600))
    _, pval = stats.chisquare(total.numpy())
    assert pval > 1e-4


def test_modes_follow_probs():
    cfg = MixConfig(image_size=32, patch_size=16, mask_patch=16,
                    probs={"maskmix": 0.4, "mixup": 0.3, "cutmix": 0.1}, seed=5)
    modes = np.array([sample_mix(cfg, 2, k).mode for k in range(5000)])
    observed = np.bincount(modes, minlength=4)
    expected = np.array([0.2, 0.3, 0.1, 0.4]) * len(modes)  # none, mixup, cutmix, maskmix
    _, pval = stats.chisquare(observed, expected)
    assert pval > 1e-4


def test_draw_is_pure_function_of_seed_shard_batch():
    cfg = MixConfig.preset("mixpro-official", image_size=64, patch_size=16, mask_patch=16, seed=11)
    same = lambda p, q: (p.mode == q.mode and torch.equal(p.token_mask, q.token_mask)  # noqa: E731
                         and torch.equal(p.partner, q.partner) and torch.equal(p.lam, q.lam))
    a, b = sample_mix(cfg, 8, 5, shard_id=1), sample_mix(cfg, 8, 5, shard_id=1)
    assert same(a, b)
    others = [sample_mix(cfg, 8, 5, shard_id=2), sample_mix(cfg, 8, 6, shard_id=1),
              sample_mix(MixConfig.from_dict({**cfg.to_dict(), "seed": 12}), 8, 5, shard_id=1)]
    for o in others:
        assert not same(o, a)


def test_partner_flip_and_perm():
    flip = sample_mix(MixConfig(image_size=32, patch_size=16, mask_patch=16, partner="flip"), 7, 0)
    assert flip.partner.tolist() == [6, 5, 4, 3, 2, 1, 0]
    perm = MixConfig(image_size=32, patch_size=16, mask_patch=16, partner="perm")
    parts = [sample_mix(perm, 7, k).partner for k in range(5)]
    assert all(sorted(p.tolist()) == list(range(7)) for p in parts)
    assert len({tuple(p.tolist()) for p in parts}) > 1


def test_official_preset_pairs_per_mode():
    """mixpro-official: MaskMix batches by a random permutation (official code), Mixup and CutMix
    batches by x.flip(0) (the official code sends them through timm's Mixup). With a permutation
    about one sample per batch is its own partner; with the flip none is (even B) and every
    pair is symmetric."""
    cfg = MixConfig.preset("mixpro-official", image_size=64, patch_size=16, mask_patch=16, seed=4)
    b, seen, perms = 16, set(), set()
    for k in range(200):
        p = sample_mix(cfg, b, k)
        part = p.partner.numpy()
        seen.add(p.mode)
        if p.mode in (MODES["mixup"], MODES["cutmix"]):
            np.testing.assert_array_equal(part, np.arange(b)[::-1])
        elif p.mode == MODES["maskmix"]:
            assert sorted(part.tolist()) == list(range(b))
            perms.add(tuple(part.tolist()))
    assert seen == {MODES["mixup"], MODES["cutmix"], MODES["maskmix"]}
    assert len(perms) > 50                                # a fresh permutation per batch


def _draws_before_per_mode_partners(cfg: MixConfig, b: int, k: int, shard: int):
    """The draw order of sample_mix before partners became per mode, written out in numpy:
    mode, partner (one rule for every mode), then the mode's own draws."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed, shard, k])))
    u, acc, mode = rng.random(), 0.0, MODES["none"]
    for name in ("mixup", "cutmix", "maskmix"):
        acc += cfg.probs.get(name, 0.0)
        if u < acc:
            mode = MODES[name]
            break
    partner = np.arange(b)[::-1] if cfg.partner == "flip" else rng.permutation(b)
    h, w = cfg.token_grid
    mask, blend = np.ones((b, h, w), np.uint8), 1.0
    if mode == MODES["maskmix"]:
        gh, gw = cfg.cell_grid
        tau = rng.beta(cfg.beta, cfg.beta, size=b if cfg.per_sample_ratio else 1)
        raw = tau * gh * gw
        n = np.clip(np.floor(raw) if cfg.rounding == "floor" else np.ceil(raw), 0, gh * gw)
        ranks = rng.random((b, gh * gw)).argsort(1).argsort(1)
        cells = (ranks < n[:, None]).reshape(b, gh, gw)
        k_tok = cfg.mask_patch // cfg.patch_size
        mask = cells.repeat(k_tok, 1).repeat(k_tok, 2)[:, :h, :w].astype(np.uint8)
    elif mode == MODES["cutmix"]:
        cut = np.sqrt(1.0 - rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
        ch, cw = int(round(h * cut)), int(round(w * cut))
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        mask[:, max(cy - ch // 2, 0):min(cy + ch - ch // 2, h),
             max(cx - cw // 2, 0):min(cx + cw - cw // 2, w)] = 0
    elif mode == MODES["mixup"]:
        blend = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
    if mode == MODES["none"]:
        partner = np.arange(b)
    return mode, partner, mask, blend


@pytest.mark.parametrize("preset", ["mixpro", "transmix", "deit", "maskmix", "none"])
@pytest.mark.parametrize("partner", [None, "flip", "perm"])
def test_other_presets_draw_exactly_as_before(preset, partner):
    """Per-mode partners changed mixpro-official only: every other preset, with either single
    partner rule, draws the same decisions from the same seed as before."""
    over = {} if partner is None else {"partner": partner}
    cfg = MixConfig.preset(preset, image_size=(48, 80), patch_size=8, mask_patch=24, seed=9,
                           per_sample_ratio=preset == "maskmix", **over)
    for shard, k in [(0, k) for k in range(60)] + [(3, 7), (1, 123)]:
        p = sample_mix(cfg, 6, k, shard_id=shard)
        mode, part, mask, blend = _draws_before_per_mode_partners(cfg, 6, k, shard)
        assert p.mode == mode and p.blend == blend
        np.testing.assert_array_equal(p.partner.numpy(), part)
        np.testing.assert_array_equal(p.token_mask.numpy(), mask)


def test_cutmix_box_is_token_aligned_and_lambda_exact():
    cfg = MixConfig.preset("deit", image_size=(64, 96), patch_size=16, mask_patch=16,
                           probs={"cutmix": 1.0}, seed=3)
    for k in range(50):
        p = sample_mix(cfg, 4, k)
        assert p.mode == MODES["cutmix"]
        hole = p.token_mask[0] == 0
        if hole.any():
            rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
            box = hole[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.all()  # one rectangle of whole tokens
        assert (p.token_mask == p.token_mask[0]).all()  # one box per batch, as timm
        torch.testing.assert_close(p.lam, area_lambda(p.token_mask))


@pytest.mark.parametrize("layout", ["HWC", "CHW"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16])
def test_apply_mix_takes_each_token_from_one_image(layout, dtype):
    cfg = MixConfig.preset("mixpro-official", image_size=(48, 80), patch_size=8, mask_patch=24,
                           probs={"maskmix": 1.0}, seed=4)
    b, (hh, ww) = 6, cfg.image_size
    ids = torch.arange(1, b + 1, dtype=torch.float32) * 20           # image i is constant ids[i]
    x = ids.view(b, 1, 1, 1).expand(b, hh, ww, 3) if layout == "HWC" else ids.view(b, 1, 1, 1).expand(b, 3, hh, ww)
    x = x.to(dtype).contiguous()
    before = x.clone()
    p = sample_mix(cfg, b, 0)
    out = apply_mix(x, p, patch_size=8, layout=layout)
    assert out.dtype == dtype and out.shape == x.shape and torch.equal(x, before)
    img = out.float() if layout == "CHW" else out.float().permute(0, 3, 1, 2)
    tokens = img[:, 0].unfold(1, 8, 8).unfold(2, 8, 8)              # (B, h, w, 8, 8)
    assert (tokens == tokens[..., :1, :1]).all()                     # tokens are never split
    own = ids.view(b, 1, 1)
    partner = ids[p.partner].view(b, 1, 1)
    value = tokens[..., 0, 0]
    torch.testing.assert_close(value, torch.where(p.token_mask.bool(), own, partner))


def test_mixup_blend_and_none_copy():
    cfg = MixConfig(image_size=32, patch_size=16, mask_patch=16, probs={"mixup": 1.0}, seed=9)
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    p = sample_mix(cfg, 4, 0)
    assert p.mode == MODES["mixup"] and (p.token_mask == 1).all()
    torch.testing.assert_close(p.lam, torch.full((4,), p.blend))
    want = (x.float() * p.blend + x.flip(0).float() * (1 - p.blend)).round().to(torch.uint8)
    assert torch.equal(apply_mix(x, p, patch_size=16), want)
    xf = x.float()
    torch.testing.assert_close(apply_mix(xf, p, patch_size=16), xf * p.blend + xf.flip(0) * (1 - p.blend))
    none = sample_mix(MixConfig.preset("none", image_size=32, patch_size=16, mask_patch=16), 4, 0)
    assert none.mode == 0 and (none.lam == 1).all() and torch.equal(apply_mix(x, none, patch_size=16), x)


def reference_mix(images, params, *, patch_size, layout):
    """The slow obvious semantics, sample by sample: a pixel mask from the token mask, a select
    (MaskMix, CutMix), a blend (Mixup: lerp on floats; uint8 rounds the float32 blend)."""
    out = []
    for i, j in enumerate(params.partner.tolist()):
        a, b = images[i], images[j]
        if params.mode == MODES["none"]:
            out.append(a.clone())
        elif params.mode == MODES["mixup"]:
            if a.is_floating_point():
                out.append(torch.lerp(b, a, params.blend))
            else:
                out.append((a.float() * params.blend + b.float() * (1.0 - params.blend))
                           .round().clamp(0, 255).to(a.dtype))
        else:
            keep = params.token_mask[i].bool()
            keep = keep.repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)   # (H, W)
            keep = keep[:, :, None] if layout == "HWC" else keep[None]
            out.append(torch.where(keep, a, b))
    return torch.stack(out)


MIX_CASES = [("HWC", torch.uint8), ("CHW", torch.float32), ("CHW", torch.float16),
             ("HWC", torch.float32), ("CHW", torch.uint8)]


@pytest.mark.parametrize("layout,dtype", MIX_CASES)
@pytest.mark.parametrize("mode", ["maskmix", "cutmix", "mixup", "none"])
@pytest.mark.parametrize("size,patch,cell,partner", [((48, 80), 8, 24, "perm"), ((32, 32), 16, 16, "flip"),
                                                     ((224, 224), 16, 64, "perm")])
def test_apply_mix_equals_per_sample_reference_bitwise(layout, dtype, mode, size, patch, cell, partner):
    """The batch kernel (index_select of token rows / gathered lerp) against the per-sample
    reference, bit for bit, on random pixels; the input is not modified; `out` is honoured."""
    cfg = MixConfig(image_size=size, patch_size=patch, mask_patch=cell, partner=partner,
                    probs={} if mode == "none" else {mode: 1.0}, seed=3)
    b = 5 if size[0] > 100 else 7
    shape = (b, *size, 3) if layout == "HWC" else (b, 3, *size)
    gen = torch.Generator().manual_seed(size[0] + patch)
    for k in range(3):
        x = (torch.rand(shape, generator=gen) * 255).to(dtype) if dtype == torch.uint8 else \
            torch.randn(shape, generator=gen).to(dtype)
        before = x.clone()
        p = sample_mix(cfg, b, k)
        assert p.mode == MODES[mode]
        want = reference_mix(x, p, patch_size=patch, layout=layout)
        got = apply_mix(x, p, patch_size=patch, layout=layout)
        assert got.dtype == dtype and torch.equal(got, want) and torch.equal(x, before)
        buf = torch.full_like(x, 7)
        assert apply_mix(x, p, patch_size=patch, layout=layout, out=buf) is buf
        assert torch.equal(buf, want)


def test_uint8_mixup_chunks_on_cpu_equal_one_chunk(monkeypatch):
    """The CPU's cache-sized chunks of the uint8 blend give the GPU's single chunk's result."""
    import mixpro_dali.masks as masks

    cfg = MixConfig(image_size=32, patch_size=8, mask_patch=8, probs={"mixup": 1.0}, partner="perm")
    x = torch.randint(0, 256, (9, 32, 32, 3), dtype=torch.uint8)
    p = sample_mix(cfg, 9, 2)
    whole = apply_mix(x, p, patch_size=8)
    monkeypatch.setattr(masks, "_CPU_CHUNK_BYTES", 2 * 4 * 32 * 32 * 3)        # chunks of 2
    assert torch.equal(apply_mix(x, p, patch_size=8), whole)
    assert torch.equal(whole, reference_mix(x, p, patch_size=8, layout="HWC"))


@pytest.mark.parametrize("layout,dtype", [("CHW", torch.float16), ("CHW", torch.float32),
                                          ("HWC", torch.uint8)])
@pytest.mark.parametrize("mode", ["maskmix", "cutmix", "mixup"])
def test_apply_mix_op_count_does_not_grow_with_batch(layout, dtype, mode):
    """The same ops (count and kinds) at B=16 and B=64: no per-sample loop."""
    cfg = MixConfig(image_size=32, patch_size=8, mask_patch=16, partner="perm", probs={mode: 1.0})
    counts = {}
    for b in (16, 64):
        shape = (b, 32, 32, 3) if layout == "HWC" else (b, 3, 32, 32)
        x = torch.zeros(shape, dtype=dtype)
        p = sample_mix(cfg, b, 1)
        out = torch.empty_like(x)
        with CountOps() as mode_ops:
            apply_mix(x, p, patch_size=8, layout=layout, out=out)
        counts[b] = mode_ops.ops
    assert counts[16] == counts[64] and 0 < len(counts[16]) <= 8, counts


def test_stage_params_is_the_identity_on_cpu():
    p = sample_mix(MixConfig.preset("maskmix", image_size=32, patch_size=8, mask_patch=16), 4, 0)
    assert stage_params(p, "cpu") is p


@needs_cuda
def test_stage_params_and_apply_mix_on_cuda_equal_cpu_without_sync():
    cfg = MixConfig.preset("mixpro-official", image_size=(48, 80), patch_size=8, mask_patch=24, seed=1)
    x = torch.randn(8, 3, 48, 80).half()
    xd = x.cuda()
    for k in range(8):
        p = sample_mix(cfg, 8, k)
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = apply_mix(xd, stage_params(p, xd.device), patch_size=8, layout="CHW")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(got.cpu(), apply_mix(x, p, patch_size=8, layout="CHW"))


@pytest.mark.parametrize("mode", ["maskmix", "mixup", "cutmix"])
def test_mix_samples_is_apply_mix_per_sample(mode):
    """The per-sample entry point (public since 0.1) gives apply_mix's batch, into `out` too."""
    cfg = MixConfig.preset("mixpro", image_size=32, patch_size=8, mask_patch=16,
                           probs={mode: 1.0})
    params = sample_mix(cfg, 4, batch_index=2)
    images = torch.rand(4, 32, 32, 3)
    want = apply_mix(images, params, patch_size=8)
    got = mix_samples(images.unbind(0), params, patch_size=8)
    assert torch.equal(torch.stack(got), want)
    out = [torch.full_like(images[0], -1.0) for _ in range(4)]
    res = mix_samples(list(images.unbind(0)), params, patch_size=8, out=out)
    assert all(r is o for r, o in zip(res, out)) and torch.equal(torch.stack(out), want)


def test_mix_samples_none_returns_the_inputs():
    params = sample_mix(MixConfig.preset("none", image_size=32, patch_size=8), 3, batch_index=0)
    samples = list(torch.rand(3, 3, 32, 32).unbind(0))
    assert all(a is b for a, b in zip(mix_samples(samples, params, patch_size=8, layout="CHW"),
                                       samples))


def test_token_runs_merge_only_tokens_with_one_source():
    """`_run_tokens`: the longest aligned runs (dividing w) with one source in every sample; a
    2x4 grid with MaskMix cells of 2 tokens copies runs of 2, a GPU mask is never read."""
    from mixpro_dali.masks import _run_tokens

    mask = torch.tensor([[[1, 1, 0, 0], [0, 0, 0, 0]], [[0, 0, 1, 1], [1, 1, 1, 1]]],
                        dtype=torch.uint8)
    assert _run_tokens(mask) == 2
    assert _run_tokens(torch.ones(3, 2, 6, dtype=torch.uint8)) == 6
    mask[1, 1, 1] = 0
    assert _run_tokens(mask) == 1
    cfg = MixConfig.preset("maskmix", image_size=224, patch_size=16, mask_patch=64, seed=0)
    assert all(_run_tokens(sample_mix(cfg, 8, k).token_mask) in (2, 7, 14) for k in range(5))
