"""Shared test helpers: compare a kernel with its PyTorch reference, value and gradient."""
from __future__ import annotations

import torch

DEVICES = [("cpu", torch.float32), ("cuda", torch.float32), ("cuda", torch.bfloat16)]
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def leaf(t: torch.Tensor, device, dtype) -> torch.Tensor:
    return t.to(device=device, dtype=dtype).detach().requires_grad_()


def compare(kernel_fn, reference_fn, inputs: list[torch.Tensor], dtype, seed: int = 0):
    """Run ``kernel_fn(*inputs)`` and ``reference_fn`` on fp32 copies of the same inputs; assert that the outputs
    and the gradients of every input (for random upstream gradients) agree to ``dtype``'s tolerance."""
    ref_inputs = [x.detach().float().requires_grad_(x.requires_grad) for x in inputs]
    out, ref = kernel_fn(*inputs), reference_fn(*ref_inputs)
    out, ref = (out if isinstance(out, tuple) else (out,)), (ref if isinstance(ref, tuple) else (ref,))
    assert len(out) == len(ref)
    g = torch.Generator().manual_seed(seed)
    ups = [torch.randn(r.shape, generator=g).to(r.device) for r in ref]
    tol = TOLERANCE[dtype]
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == dtype
        torch.testing.assert_close(o.float(), r, **tol)
    wrt = [i for i, x in enumerate(inputs) if x.requires_grad]
    grads = torch.autograd.grad(out, [inputs[i] for i in wrt], [u.to(o.dtype) for u, o in zip(ups, out)])
    ref_grads = torch.autograd.grad(ref, [ref_inputs[i] for i in wrt], ups)
    for i, gk, gr in zip(wrt, grads, ref_grads):
        assert gk.shape == inputs[i].shape, f"gradient of input {i} has the wrong shape"
        torch.testing.assert_close(gk.float(), gr, **tol, msg=lambda m: f"gradient of input {i}: {m}")
