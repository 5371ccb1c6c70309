"""minllama.kernels: Triton kernels for MinimalLlama (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy,
decode attention).

    from minllama.kernels import apply, fused_loss
    apply(model)                          # swaps in the kernels when Triton can run on the model's device
    loss = fused_loss(model, tokens, targets)   # the training loss without the (tokens, vocab) logits

Every kernel has a PyTorch fallback, used where Triton cannot run (a CPU without TRITON_INTERPRET=1, no triton).

    from minllama.kernels import use_cpu_gemv
    use_cpu_gemv(model)                   # batch-1 decode on a CPU: the C++ AVX-512 GEMV for every nn.Linear
"""
from .swap import (KernelAttention, KernelFeedForward, KernelRMSNorm, KernelTransformerBlock, apply, fused_loss,
                    is_applied, remove)
from .cpu_gemv import GemvLinear, remove_cpu_gemv, use_cpu_gemv
from .cross_entropy import fused_linear_cross_entropy
from .decode_attention import decode_attention
from .rmsnorm import rms_norm
from .rope import rope_qk
from .runtime import interpreting, triton_usable
from .swiglu import swiglu

__all__ = ["apply", "remove", "is_applied", "fused_loss", "fused_linear_cross_entropy", "decode_attention", "rms_norm",
           "rope_qk", "swiglu", "triton_usable", "interpreting", "KernelRMSNorm", "KernelAttention",
           "KernelFeedForward", "KernelTransformerBlock", "use_cpu_gemv", "remove_cpu_gemv", "GemvLinear"]
