"""minllama.kernels: Triton kernels for MinimalLlama (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy,
decode attention).

    from minllama.kernels import apply, fused_loss
    apply(model)                          # swaps in the kernels when Triton can run on the model's device
    loss = fused_loss(model, tokens, targets)   # the training loss without the (tokens, vocab) logits

Every kernel has a PyTorch fallback, used where Triton cannot run (a CPU without TRITON_INTERPRET=1, no triton).

    from minllama.kernels import use_cpu_decode
    use_cpu_decode(model)                 # batch-1 decode on a CPU: each one-token step's layers in C++ (AVX-512)
"""
import importlib

# name -> the submodule that defines it. Imported on first use (PEP 562), so that the CPU decode path
# (``minllama.kernels.cpu_decode``) does not load Triton: ~50 MB of memory and ~0.1 s it never uses.
_WHERE = {
    **dict.fromkeys(["KernelAttention", "KernelFeedForward", "KernelRMSNorm", "KernelTransformerBlock", "apply",
                     "fused_loss", "is_applied", "remove"], "swap"),
    **dict.fromkeys(["GemvLinear", "remove_cpu_gemv", "use_cpu_gemv"], "cpu_gemv"),
    **dict.fromkeys(["use_cpu_decode", "remove_cpu_decode", "cpu_decode_unsupported"], "cpu_decode"),
    "fused_linear_cross_entropy": "cross_entropy", "decode_attention": "decode_attention_kernel",
    "rms_norm": "rmsnorm", "rope_qk": "rope", "swiglu": "swiglu_kernel", "interpreting": "runtime",
    "triton_usable": "runtime",  # (a module named like its function would shadow it once imported: hence _kernel)
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    try:  # a submodule, as an attribute (minllama.kernels.runtime)
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError:
        raise AttributeError(f"module 'minllama.kernels' has no attribute {name!r}") from None
