"""pipelines/compat.py: every private API is there, with the signature the shims call, on a
version they were verified on; the public fallbacks give the same results. A failure here after
a pin change means: read the private code named in the message, then add the version to
compat.VERIFIED (or fix the shim)."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from nvidia.dali import fn, pipeline_def, types

from pipelines import compat


def test_installed_versions_are_the_verified_ones():
    assert compat.unverified() == {}, (
        f"installed {compat.installed_versions()}, shims verified on {compat.VERIFIED}: "
        "check each private API of pipelines/compat.py on the new version")


def test_private_symbols_have_the_expected_signatures():
    from nvidia.dali import _conditionals
    from nvidia.dali.pipeline import Pipeline
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    assert torch._C._storage_Use_Count.__doc__.strip().startswith("_storage_Use_Count(arg0")
    assert torch._C._storage_Use_Count.__doc__.strip().split("\n")[0].endswith("-> int")
    for mode in ("bicubic", "bilinear"):
        schema = str(getattr(torch.ops.aten, f"_upsample_{mode}2d_aa").out._schema)
        assert schema == (f"aten::_upsample_{mode}2d_aa.out(Tensor self, SymInt[2] output_size, "
                          "bool align_corners, float? scales_h=None, float? scales_w=None, *, "
                          "Tensor(a!) out) -> Tensor(a!)")
    assert list(inspect.signature(Pipeline._shutdown).parameters) == ["self"]
    assert list(inspect.signature(_conditionals.conditionals_enabled).parameters) == []
    assert list(inspect.signature(torch.cuda._sleep).parameters) == ["cycles"]
    assert list(inspect.signature(_MultiProcessingDataLoaderIter._shutdown_workers).parameters) \
        == ["self"]
    compat.require_dali_graph_internals()               # raises naming what is missing


def test_no_warning_on_the_pinned_versions():
    with warnings.catch_warnings():
        warnings.simplefilter("error", compat.PrivateAPIWarning)
        assert compat.storage_holders() is not None
        compat.require_dali_graph_internals()


def test_storage_holders_counts_tensors_and_views():
    holders = compat.storage_holders()
    a = torch.zeros(3, 4)
    assert holders(a) == 1
    view, flat = a[1:], a.view(-1)
    assert holders(a) == 3 and holders(view) == 3
    del view
    assert holders(a) == 2
    del flat
    assert holders(a) == 1
    assert holders(torch.zeros(2)) == 1                 # another tensor: its own storage


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("src,size", [((375, 500), (224, 224)), ((100, 80), (224, 224)),
                                      ((224, 224), (224, 224)), ((31, 47), (13, 90))])
def test_resize_kernel_is_bitwise_interpolate_with_antialias(mode, src, size):
    g = torch.Generator().manual_seed(sum(src))
    hwc = torch.randint(0, 256, (*src, 3), dtype=torch.uint8, generator=g)
    x = hwc.permute(2, 0, 1).unsqueeze(0)                   # channels-last view, as DALI gives
    private = torch.empty((*size, 3), dtype=torch.uint8)
    public = torch.empty((*size, 3), dtype=torch.uint8)
    compat.resize_aa_into(x, size, mode, private.permute(2, 0, 1).unsqueeze(0))
    compat.resize_aa_public(x, size, mode, public.permute(2, 0, 1).unsqueeze(0))
    ref = torch.nn.functional.interpolate(x, size=size, mode=mode, antialias=True)
    assert torch.equal(private, public)
    assert torch.equal(private.permute(2, 0, 1).unsqueeze(0), ref)


def _pipe(conditionals: bool, seen: list):
    @pipeline_def(batch_size=2, num_threads=1, device_id=None, enable_conditionals=conditionals)
    def pipe():
        seen.append(compat.conditionals_enabled())
        return fn.random.uniform(range=[0.0, 1.0], dtype=types.FLOAT)

    return pipe()


@pytest.mark.parametrize("conditionals", [True, False])
def test_conditionals_enabled_and_shutdown(conditionals):
    seen: list = []
    p = _pipe(conditionals, seen)
    p.build()
    assert seen == [conditionals]
    (out,) = p.run()
    assert len(out) == 2
    compat.shutdown_pipeline(p)
    with pytest.raises(AttributeError):
        p.run()                                          # DALI 2.4: the executor is gone
    compat.shutdown_pipeline(p)                          # twice is harmless


def test_compiled_original_unwraps_torch_compile_only():
    model = torch.nn.Linear(2, 2)
    assert compat.compiled_original(model) is model
    assert compat.compiled_original(torch.compile(model)) is model


def test_dataloader_workers_shut_down():
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=1,
                                         persistent_workers=True)
    assert list(next(iter(loader))) == [0, 1]
    workers = list(loader._iterator._workers)
    assert all(w.is_alive() for w in workers) and workers
    compat.shutdown_dataloader_workers(loader)
    assert not any(w.is_alive() for w in workers)
    compat.shutdown_dataloader_workers(torch.utils.data.DataLoader([1]))   # never iterated


def test_an_unverified_version_warns_once_and_still_uses_the_api(monkeypatch):
    compat._check.cache_clear()
    monkeypatch.setitem(compat.VERIFIED, "dali", ("0.0.0",))
    try:
        with pytest.warns(compat.PrivateAPIWarning, match=r"verified on dali 0\.0\.0, not 2\.4"):
            compat.require_dali_graph_internals()
        with warnings.catch_warnings():
            warnings.simplefilter("error", compat.PrivateAPIWarning)
            compat.require_dali_graph_internals()        # once per API
        assert compat.unverified() == {"dali": compat.installed_versions()["dali"]}
    finally:
        compat._check.cache_clear()


def test_a_missing_api_falls_back_to_the_public_path(monkeypatch):
    compat._check.cache_clear()
    compat.storage_holders.cache_clear()
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    try:
        with pytest.warns(compat.PrivateAPIWarning, match="absent in torch"):
            assert compat.storage_holders() is None
    finally:
        monkeypatch.undo()
        compat._check.cache_clear()
        compat.storage_holders.cache_clear()
    assert compat.storage_holders() is not None


def test_token_drop_on_public_timm_api_equals_the_private_pos_embed_path():
    """train.robustness.forward_kept_tokens replaced timm's private _pos_embed by the public
    forward_features: the logits are bitwise those of the old path."""
    from timm.models.vision_transformer import VisionTransformer

    from train.robustness import forward_kept_tokens, keep_mask, drop_order

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              num_classes=5, reg_tokens=1).eval()
    x = torch.randn(3, 3, 32, 32)
    keep = keep_mask(drop_order("random", batch=3, num_tokens=16,
                                generator=torch.Generator().manual_seed(1)), 5, (4, 4))
    idx = keep.flatten(1).nonzero()[:, 1].view(3, -1)
    with torch.no_grad():
        got = forward_kept_tokens(model, x, keep)
        t = model._pos_embed(model.patch_embed(x))
        P = model.num_prefix_tokens
        t = torch.cat([t[:, :P], t[:, P:].gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))], 1)
        old = model.forward_head(model.norm(model.blocks(model.norm_pre(t))))
    assert torch.equal(got, old) and got.shape == (3, 5)
    assert isinstance(model.patch_drop, torch.nn.Identity)      # restored
