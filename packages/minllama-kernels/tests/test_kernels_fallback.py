"""Without triton (macOS, Windows) the package still imports, every function computes with PyTorch, and apply
leaves the model alone. Run in a fresh interpreter where importing triton fails."""
import subprocess
import sys

PROGRAM = r'''
import sys
sys.modules["triton"] = None  # `import triton` now fails, as on a platform where it is not installed

import torch
import torch.nn.functional as F
import minllama.kernels as K
from minllama.core.config import LlamaConfig
from minllama.core.model import MinimalLlama, RMSNorm, apply_rope, rope_cache

assert not K.runtime.HAS_TRITON and not K.triton_usable("cpu")
torch.manual_seed(0)
x, w = torch.randn(3, 8), torch.randn(8)
norm = RMSNorm(8)
norm.weight.data.copy_(w)
assert torch.allclose(K.rms_norm(x, w), norm(x))
rope = rope_cache(torch.tensor([1.0, 0.5]), 3)
q, k = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 1, 4)
assert torch.equal(K.rope_qk(q, k, rope)[0], apply_rope(q, rope))
assert torch.equal(K.swiglu(x, w.expand(3, 8)), F.silu(x) * w)
W, t = torch.randn(11, 8), torch.tensor([1, -100, 10])
assert torch.allclose(K.fused_linear_cross_entropy(x, W, t), F.cross_entropy(x @ W.T, t))
model = K.apply(MinimalLlama(LlamaConfig.from_name("tiny-gqa")))
assert not K.is_applied(model)
print("fallback ok")
'''


def test_package_works_without_triton():
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "fallback ok" in out.stdout
