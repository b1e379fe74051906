"""Shared check: attaching ClsAttention changes neither a model's outputs nor its gradients."""
import torch

from mixpro_dali import ClsAttention


def assert_hook_transparent(model: torch.nn.Module, x: torch.Tensor) -> None:
    """One forward/backward without and one with the hook: bitwise equal outputs and
    gradients for every parameter, and maps that carry no autograd graph."""
    def step():
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    out0, grads0 = step()
    with ClsAttention(model) as cls_attn:
        out1, grads1 = step()
        assert not cls_attn.maps.requires_grad and cls_attn.maps.grad_fn is None
    assert torch.equal(out0, out1)
    assert len(grads0) == len(grads1) == sum(1 for _ in model.parameters())
    assert all(map(torch.equal, grads0, grads1))
