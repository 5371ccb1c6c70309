"""Fused linear + cross-entropy vs logits = h @ W.T then F.cross_entropy: loss, grad of h and of W, and memory."""
import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from kernels_helpers import compare, leaf
from minllama.kernels import fused_linear_cross_entropy

IGNORE = -100


def reference(h, w, targets, **kw):
    return F.cross_entropy(h @ w.T, targets, **kw)


def case(device, dtype, N=11, H=9, V=37, seed=0):
    torch.manual_seed(seed)
    h, w = leaf(torch.randn(N, H), device, dtype), leaf(torch.randn(V, H) / 2, device, dtype)
    targets = torch.randint(0, V, (N,))
    targets[[2, N - 1]] = IGNORE
    return h, w, targets.to(device)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_fused_ce_matches_reference(target, reduction, smoothing):
    device, dtype = target
    h, w, t = case(device, dtype)
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    # chunk_size=4 does not divide 11 tokens: the last chunk is partial
    compare(lambda h, w: fused_linear_cross_entropy(h, w, t, chunk_size=4, **kw),
            lambda h, w: reference(h, w, t, **kw), [h, w], dtype)


def test_fused_ce_torch_path_matches_reference(target):
    """The PyTorch fallback of the per-chunk step computes the same thing as the kernel."""
    device, dtype = target
    h, w, t = case(device, dtype, seed=1)
    t = t.int()  # int32 class indices are accepted too
    for reduction in ("mean", "none"):
        compare(lambda h, w: fused_linear_cross_entropy(h, w, t, reduction=reduction, label_smoothing=0.1,
                                                        chunk_size=3, use_triton=False),
                lambda h, w: reference(h, w, t.long(), reduction=reduction, label_smoothing=0.1), [h, w], dtype)


def test_fused_ce_ignored_row_and_batch_shape(target):
    """(B, T) targets with a whole sequence ignored, non-contiguous (B, T, dim) hidden states, tied-size vocab."""
    device, dtype = target
    torch.manual_seed(2)
    B, T, H, V = 3, 5, 7, 29
    h = leaf(torch.randn(T, B, H), device, dtype).transpose(0, 1)  # (B, T, H), not contiguous
    w = leaf(torch.randn(V, H), device, dtype)
    t = torch.randint(0, V, (B, T))
    t[1] = IGNORE  # a whole row: its tokens contribute neither loss nor gradient
    t = t.to(device)
    for reduction in ("mean", "none"):
        compare(lambda h, w: fused_linear_cross_entropy(h, w, t, reduction=reduction, chunk_size=4),
                lambda h, w: F.cross_entropy((h @ w.T).transpose(1, 2), t, reduction=reduction), [h, w], dtype)


def test_fused_ce_custom_ignore_index_and_single_chunk(target):
    device, dtype = target
    h, w, t = case(device, dtype, N=6, V=40, seed=3)
    t = torch.where(t == IGNORE, 5, t)
    compare(lambda h, w: fused_linear_cross_entropy(h, w, t, ignore_index=5),
            lambda h, w: reference(h, w, t, ignore_index=5), [h, w], dtype)


def test_fused_ce_gradient_only_for_hidden(target):
    """A frozen head (weight without grad) is fine: only the hidden states get a gradient."""
    device, dtype = target
    h, w, t = case(device, dtype, seed=4)
    w = w.detach()
    compare(lambda h: fused_linear_cross_entropy(h, w, t, chunk_size=5), lambda h: reference(h, w.float(), t),
            [h], dtype)


def test_fused_ce_rejects_bad_input():
    h, w = torch.randn(4, 3), torch.randn(10, 3)
    with pytest.raises(ValueError, match="outside"):
        fused_linear_cross_entropy(h, w, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="targets of shape"):
        fused_linear_cross_entropy(h, w, torch.zeros(3, dtype=torch.long))


def peak_cpu_bytes(fn) -> int:
    """Peak of live CPU tensor memory while ``fn`` runs, from the profiler's record of every allocation and free."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.name == "[memory]":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def test_fused_ce_peak_memory_is_lower():
    """Forward + backward at N=512 tokens, vocab 16,384: the plain version holds (N, V) logits and their softmax
    gradient (32 MiB each in fp32); the chunked one only (C, V) chunks. Measured on the PyTorch path of the
    chunked algorithm: under the interpreter a Triton kernel's memory is NumPy's, invisible to the profiler."""
    torch.manual_seed(0)
    N, H, V = 512, 64, 16384
    h, w = torch.randn(N, H, requires_grad=True), (torch.randn(V, H) / 8).requires_grad_()
    t = torch.randint(0, V, (N,))

    def plain():
        F.cross_entropy(h @ w.T, t).backward()

    def fused():
        fused_linear_cross_entropy(h, w, t, use_triton=False).backward()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy shared CPU, multi-threaded exp over 256 small chunks crawls
    try:
        plain_peak, fused_peak = peak_cpu_bytes(plain), peak_cpu_bytes(fused)
    finally:
        torch.set_num_threads(threads)
    logits_bytes, weight_bytes = N * V * 4, V * H * 4
    assert plain_peak >= 2 * logits_bytes  # the oracle sees the logits and their gradient live at once
    # What remains is the weight's gradient (which training needs anyway) plus chunk-sized temporaries:
    assert fused_peak < 1.5 * weight_bytes < logits_bytes / 4, (fused_peak, plain_peak)
    print(f"peak MiB: logits + F.cross_entropy {plain_peak / 2**20:.1f}, fused {fused_peak / 2**20:.1f}")
