"""MaskMix / CutMix / Mixup kernels in plain torch: one implementation for CPU and GPU.

`sample_mix` draws every random decision of one batch on the host from a pure function of
(seed, shard, batch index); the draw is O(batch x cells) and runs in numpy (a handful of
vectorized calls, no torch op: on the operator's path each torch op also hands the GIL over). `apply_mix` is deterministic given
those parameters and mixes a dense batch on the images' device with a fixed number of torch ops
(no per-sample loop); `stage_params` gets the few decision bytes to a GPU without a host sync.
No pixel mask is ever built (the reference code materializes one as int64 on the host).

Worked example: a 2x2 token grid with token_mask [[1, 0], [0, 0]] gives lam 0.25 (the sample
keeps one token of four, MixPro Eq. 3: x_mix = M * x_a + (1 - M) * x_b).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .config import MixConfig


@dataclass(frozen=True)
class Mode:
    """One mixing mode, a row of the mode table (`MODE_TABLE`, `register_mode`).

    code: the int32 `mode` the operator emits (0 is "none"; a batch's mode is drawn from the
        config's `probs`, which take their mass in code order).
    sample(rng, config, batch_size) -> (token_mask (B, h, w) uint8, lam (B,) float32, blend):
        the mode's own random draws, made after the mode and the partner (randomness only here);
        token_mask and lam as torch tensors or numpy arrays (the built-in modes use numpy).
    apply(images, params, out, patch_size, layout) -> out: deterministic given the params.
    """

    code: int
    name: str
    sample: Callable
    apply: Callable


@dataclass(frozen=True)
class MixParams:
    """Everything decided for one batch. Tensors live on the host (small)."""

    mode: int                 # 0 none, 1 mixup, 2 cutmix, 3 maskmix (one per batch)
    partner: torch.Tensor     # (B,) int64: sample i is mixed with partner[i]
    token_mask: torch.Tensor  # (B, h, w) uint8: 1 = token from the sample itself
    lam: torch.Tensor         # (B,) float32: weight of the sample's own label
    blend: float = 1.0        # Mixup blend weight of the sample itself (1.0 otherwise)


def batch_rng(seed: int, shard_id: int, batch_index: int) -> np.random.Generator:
    """Independent stream per (seed, shard, batch): resumable and never shared by shards."""
    if min(seed, shard_id, batch_index) < 0:
        raise ValueError(
            f"seed, shard_id and batch_index must be >= 0, got {seed}, {shard_id}, {batch_index}"
        )
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, shard_id, batch_index])))


def sample_mode(rng: np.random.Generator, probs: dict[str, float]) -> int:
    """One mode per batch: the mixing modes take their probability mass in code order (mixup,
    cutmix, maskmix, then registered ones); the rest is "none"."""
    u = rng.random()
    acc = 0.0
    for name in mixing_modes():
        acc += probs.get(name, 0.0)
        if u < acc:
            return MODES[name]
    return MODES["none"]


def sample_partner(rng: np.random.Generator, batch_size: int, partner: str) -> np.ndarray:
    """`flip`: i <-> B-1-i (paper Alg. 1, timm). `perm`: random permutation (official code)."""
    if partner == "flip":
        return np.arange(batch_size - 1, -1, -1)
    return rng.permutation(batch_size)


def cell_counts(tau: np.ndarray, num_cells: int, rounding: str) -> np.ndarray:
    """n = floor(S*tau) (paper) or ceil(S*tau) (official code), in [0, S]."""
    raw = tau * num_cells
    n = np.floor(raw) if rounding == "floor" else np.ceil(raw)
    return np.minimum(np.maximum(n, 0), num_cells).astype(np.int64)


def sample_cells(
    rng: np.random.Generator, batch_size: int, cell_grid: tuple[int, int], counts: np.ndarray
) -> np.ndarray:
    """Each sample gets its own random set of counts[i] cells (counts (B,) or one for all,
    (1,)): the cells of the counts[i] smallest of S uniform draws. Returns (B, gh, gw) uint8,
    1 = cell kept from the sample itself."""
    num_cells = cell_grid[0] * cell_grid[1]
    order = rng.random((batch_size, num_cells)).argsort(axis=1)   # (B, S) cells by draw
    keep = np.empty((batch_size, num_cells), dtype=np.uint8)      # keep[order[i, r]] = r < n
    keep[np.arange(batch_size)[:, None], order] = np.arange(num_cells) < counts.reshape(-1, 1)
    return keep.reshape(batch_size, *cell_grid)


def cells_to_tokens(cells: torch.Tensor | np.ndarray, cell_tokens: int,
                    token_grid: tuple[int, int]) -> torch.Tensor | np.ndarray:
    """(B, gh, gw) cell mask -> (B, h, w) token mask, a tensor or an array like `cells`; the
    grid starts top-left, so partial cells sit on the bottom and right edges."""
    h, w = token_grid
    if isinstance(cells, np.ndarray):   # one gather: token (r, c) is cell (r // k, c // k)
        return cells[:, (np.arange(h) // cell_tokens)[:, None], np.arange(w) // cell_tokens]
    t = cells.repeat_interleave(cell_tokens, dim=1).repeat_interleave(cell_tokens, dim=2)
    return t[:, :h, :w].contiguous()


def sample_box(
    rng: np.random.Generator, token_grid: tuple[int, int], alpha: float
) -> tuple[int, int, int, int]:
    """timm-style CutMix box in token units (snapped to the token grid): the ratio from
    Beta(alpha, alpha), the side scaled by sqrt(1 - ratio), the centre uniform, clipped."""
    h, w = token_grid
    ratio = rng.beta(alpha, alpha)
    cut = math.sqrt(1.0 - ratio)
    ch, cw = int(round(h * cut)), int(round(w * cut))
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
    return y0, y1, x0, x1


def sample_mix(config: MixConfig, batch_size: int, batch_index: int, shard_id: int = 0) -> MixParams:
    """Draw one batch's mixing decisions: a pure function of (seed, shard, batch index)."""
    rng = batch_rng(config.seed, shard_id, batch_index)
    mode = MODE_TABLE[_NAMES[sample_mode(rng, dict(config.probs))]]
    # drawn right after the mode, as before per-mode partners: a single rule keeps its stream
    partner = sample_partner(rng, batch_size, config.partner_for(mode.name))
    token_mask, lam, blend = mode.sample(rng, config, batch_size)
    if mode.code == MODES["none"]:
        partner = np.arange(batch_size)  # unmixed: labels_b == labels_a
    if isinstance(token_mask, np.ndarray):
        token_mask = torch.from_numpy(np.ascontiguousarray(token_mask, dtype=np.uint8))
    lam = (torch.from_numpy(np.ascontiguousarray(lam, dtype=np.float32))
           if isinstance(lam, np.ndarray) else lam.float())
    return MixParams(mode.code, torch.from_numpy(np.ascontiguousarray(partner)), token_mask,
                     lam, blend)


def _ones(config: MixConfig, batch_size: int) -> np.ndarray:
    return np.ones((batch_size, *config.token_grid), dtype=np.uint8)  # (B, h, w)


def sample_unmixed(rng: np.random.Generator, config: MixConfig, batch_size: int):
    """"none": every token from the sample itself, lam 1."""
    return _ones(config, batch_size), np.ones(batch_size, dtype=np.float32), 1.0


def sample_mixup(rng: np.random.Generator, config: MixConfig, batch_size: int):
    """Mixup: one blend ~ Beta(mixup_alpha, mixup_alpha) per batch; lam = blend."""
    blend = float(rng.beta(config.mixup_alpha, config.mixup_alpha))
    return _ones(config, batch_size), np.full(batch_size, blend, dtype=np.float32), blend


def sample_cutmix(rng: np.random.Generator, config: MixConfig, batch_size: int):
    """CutMix: one token-snapped box per batch (`sample_box`); lam = exact area share."""
    token_mask = _ones(config, batch_size)
    y0, y1, x0, x1 = sample_box(rng, config.token_grid, config.cutmix_alpha)
    token_mask[:, y0:y1, x0:x1] = 0
    return token_mask, _area_lambda_host(token_mask), 1.0


def sample_maskmix(rng: np.random.Generator, config: MixConfig, batch_size: int):
    """MaskMix: tau ~ Beta(beta, beta) (per batch or per sample), n = floor|ceil(S * tau)
    random cells of the cell grid per sample; lam = exact area share."""
    gh, gw = config.cell_grid
    tau = rng.beta(config.beta, config.beta, size=batch_size if config.per_sample_ratio else 1)
    counts = cell_counts(tau, gh * gw, config.rounding)          # (B,) or (1,)
    cells = sample_cells(rng, batch_size, (gh, gw), counts)
    token_mask = cells_to_tokens(cells, config.mask_patch // config.patch_size, config.token_grid)
    return token_mask, _area_lambda_host(token_mask), 1.0


def area_lambda(token_mask: torch.Tensor) -> torch.Tensor:
    """lam_area = mean of the token mask (exact; the reference code's n/S is off by up to 0.15
    when cells do not divide the image). (B, h, w) -> (B,) float32."""
    return token_mask.flatten(1).float().mean(1)


def _area_lambda_host(token_mask: np.ndarray) -> np.ndarray:
    """`area_lambda` of a host mask in numpy, bit for bit: the token count is exact in float32
    and torch's mean divides it by the token count once. (B, h, w) -> (B,) float32."""
    b, n = token_mask.shape[0], token_mask[0].size
    return token_mask.reshape(b, n).sum(1).astype(np.float32) / np.float32(n)


_CPU_CHUNK_BYTES = 1 << 20
"""uint8 Mixup blends in float32; on the CPU it runs in chunks of samples whose float32
temporaries fit this many bytes (cache-sized: one pass over a batch-sized float32 temporary is
~3x slower here). On a GPU the whole batch is one chunk."""


def stage_params(params: MixParams, device: torch.device | str) -> MixParams:
    """`params` with `partner` and `token_mask` on `device`, without a host sync: on a GPU both
    are packed into one pinned host buffer and copied with one `non_blocking` copy on the
    current stream (torch's pinned-memory cache keeps the buffer until that copy has run).
    On the CPU `params` itself. `lam` and `blend` stay on the host."""
    device = torch.device(device)
    if device.type == "cpu" or params.mode == MODES["none"]:
        return params
    b, mask = len(params.partner), params.token_mask
    buf = torch.empty(8 * b + mask.numel(), dtype=torch.uint8, pin_memory=True)
    buf[:8 * b].view(torch.int64).copy_(params.partner)
    buf[8 * b:].copy_(mask.reshape(-1))
    dev = buf.to(device, non_blocking=True)
    return replace(params, partner=dev[:8 * b].view(torch.int64),
                   token_mask=dev[8 * b:].view(mask.shape))


def _run_tokens(token_mask: torch.Tensor) -> int:
    """Largest g dividing w such that every aligned run of g tokens of a token row has one
    source in every sample (MaskMix cells of k tokens give gcd(k, w)); 1 unless the mask is on
    the host (finding it on a GPU would be a sync). Copying g tokens per row instead of one
    moves the same bytes in fewer, longer rows (a quarter less CPU time at 224 px, cell 64)."""
    if token_mask.device.type != "cpu":
        return 1
    m = token_mask.numpy()                                                  # (B, h, w)
    b, h, w = m.shape
    for g in range(w, 1, -1):
        if w % g == 0:
            runs = m.reshape(b, h, w // g, g)
            if (runs == runs[..., :1]).all():
                return g
    return 1


def _token_rows(images: torch.Tensor, token_mask: torch.Tensor, partner: torch.Tensor,
                patch_size: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, index): `images` viewed as rows of contiguous elements that each lie inside one
    run of g tokens of one token row (`_run_tokens`; g*P of one channel for CHW, g*P*C for
    HWC), and for every output row the input row it is copied from (sample i's own row where
    token_mask[i] is 1, else partner[i]'s)."""
    b, (h, w), p = images.shape[0], token_mask.shape[1:], patch_size
    g = _run_tokens(token_mask)
    wg = w // g
    if layout == "HWC":
        c = images.shape[3]
        rows, per, own = images.view(-1, g * p * c), (h, p, wg), (b, h, 1, wg)
    else:
        c = images.shape[1]
        rows, per, own = images.view(-1, g * p), (c, h, p, wg), (b, 1, h, 1, wg)
    n = math.prod(per)                                                      # rows per sample
    itype = torch.int32 if b * n < 2**31 else torch.int64                   # half the bytes
    dev = images.device
    src = torch.where(token_mask[:, :, ::g].bool(),
                      torch.arange(b, device=dev, dtype=itype).view(b, 1, 1),
                      partner.to(itype).view(b, 1, 1))                      # (B, h, w/g)
    base = torch.arange(n, device=dev, dtype=itype).view(1, *per)
    return rows, torch.add(base, src.view(own), alpha=n).view(-1)           # (B * n,)


def _blend_uint8(images: torch.Tensor, partner: torch.Tensor, blend: float,
                 out: torch.Tensor) -> None:
    """round(blend * a + (1 - blend) * b) clamped to [0, 255], in float32, chunked on the CPU."""
    b = images.shape[0]
    step = b
    if images.device.type == "cpu":
        step = max(1, _CPU_CHUNK_BYTES // max(1, 4 * images[0].numel()))
    for s in range(0, b, step):
        a = images[s:s + step].float()
        other = images.index_select(0, partner[s:s + step]).float()
        out[s:s + step].copy_(a.mul_(blend).add_(other, alpha=1.0 - blend).round_().clamp_(0, 255))


def apply_mix(images: torch.Tensor, params: MixParams, *, patch_size: int, layout: str = "HWC",
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Mix a dense batch (B, H, W, C) | (B, C, H, W) on its device with a fixed number of torch
    ops whatever B is (MixPro Eq. 3: x_mix = M * x_a + (1 - M) * x_b). MaskMix and CutMix copy
    each token-row from its source sample with one `index_select` (one read, one write: no
    gathered partner batch and no pixel mask); Mixup gathers the partner batch and blends it
    in place (`lerp`: exactly `image` at blend 1). Writes into `out` when given (same shape
    and dtype as `images`, not aliasing it); `none` returns a copy. Params on the host are
    moved to `images.device` (a sync on a GPU: stage them with `stage_params` first)."""
    if layout not in ("HWC", "CHW"):
        raise ValueError(f"layout must be one of ('HWC', 'CHW'), got {layout!r}")
    images = images.contiguous()
    out = torch.empty_like(images) if out is None else out
    return MODE_TABLE[_NAMES[params.mode]].apply(images, params, out, patch_size, layout)


def apply_copy(images: torch.Tensor, params: MixParams, out: torch.Tensor, patch_size: int,
               layout: str) -> torch.Tensor:
    """"none": a copy of the batch."""
    return out.copy_(images)


def apply_blend(images: torch.Tensor, params: MixParams, out: torch.Tensor, patch_size: int,
                layout: str) -> torch.Tensor:
    """Mixup: out = blend * image + (1 - blend) * partner image (uint8: rounded, clamped)."""
    partner = params.partner.to(images.device)
    if images.is_floating_point():
        torch.index_select(images, 0, partner, out=out)
        torch.lerp(out, images, params.blend, out=out)   # other + blend * (image - other)
    else:
        _blend_uint8(images, partner, params.blend, out)
    return out


def apply_tokens(images: torch.Tensor, params: MixParams, out: torch.Tensor, patch_size: int,
                 layout: str) -> torch.Tensor:
    """Token copy (MaskMix, CutMix, any token-mask mode): each token from the sample itself
    where token_mask is 1, else from its partner; one `index_select` of token rows."""
    dev = images.device
    rows, index = _token_rows(images, params.token_mask.to(dev), params.partner.to(dev),
                              patch_size, layout)
    torch.index_select(rows, 0, index, out=out.view(rows.shape))
    return out


def mix_samples(samples: Sequence[torch.Tensor], params: MixParams, *, patch_size: int,
                layout: str = "HWC", out: Sequence[torch.Tensor] | None = None
                ) -> list[torch.Tensor]:
    """`apply_mix` for a batch given as its B samples (same shape, dtype and device): returns B
    tensors, written into ``out[i]`` when given, else new ones; ``none`` returns the inputs
    themselves. Kept for code written against the per-sample operator; the operator itself
    mixes the dense batch."""
    samples = list(samples)
    if params.mode == MODES["none"]:
        return samples
    mixed = apply_mix(torch.stack(samples), params, patch_size=patch_size, layout=layout)
    if out is None:
        return list(mixed.unbind(0))
    for o, m in zip(out, mixed.unbind(0)):
        o.copy_(m)
    return list(out)


# --- the mode table --------------------------------------------------------------------------
MODE_TABLE: dict[str, Mode] = {}
"""name -> Mode, in registration order. Add a mode with `register_mode` (one row)."""
MODES: dict[str, int] = {}
"""name -> code of every registered mode (the operator's int32 `mode` output): a live view."""
_NAMES: dict[int, str] = {}
_MIXING: list[tuple[str, ...]] = [()]


def mixing_modes() -> tuple[str, ...]:
    """Names of the modes that mix (all but "none"), in code order: the keys of `probs`."""
    return _MIXING[0]


def _refresh() -> None:
    MODES.clear()
    MODES.update({m.name: m.code for m in MODE_TABLE.values()})
    _NAMES.clear()
    _NAMES.update({m.code: m.name for m in MODE_TABLE.values()})
    _MIXING[0] = tuple(m.name for m in sorted(MODE_TABLE.values(), key=lambda m: m.code)
                       if m.code != 0)


def register_mode(mode: Mode) -> Mode:
    """Add a mode row; its name and code must be new (codes are int32, 0 is "none")."""
    if not isinstance(mode, Mode):
        raise TypeError(f"register_mode takes a Mode, got {type(mode).__name__}")
    if not isinstance(mode.name, str) or not mode.name or mode.name in MODE_TABLE:
        raise ValueError(f"mode name must be a new non-empty string, got {mode.name!r}; "
                         f"registered: {', '.join(MODE_TABLE)}")
    if isinstance(mode.code, bool) or not isinstance(mode.code, int) or mode.code in _NAMES \
            or not 0 <= mode.code < 2**31:
        raise ValueError(f"mode code must be a new int in [0, 2**31), got {mode.code!r}; "
                         f"taken: {sorted(_NAMES)}")
    MODE_TABLE[mode.name] = mode
    _refresh()
    return mode


def unregister_mode(name: str) -> None:
    """Remove a registered mode (the built-in ones stay)."""
    if name in _BUILTIN_MODES:
        raise ValueError(f"built-in mode {name!r} cannot be removed")
    MODE_TABLE.pop(name, None)
    _refresh()


for _mode in (Mode(0, "none", sample_unmixed, apply_copy),
              Mode(1, "mixup", sample_mixup, apply_blend),
              Mode(2, "cutmix", sample_cutmix, apply_tokens),
              Mode(3, "maskmix", sample_maskmix, apply_tokens)):
    register_mode(_mode)
_BUILTIN_MODES = tuple(MODE_TABLE)
