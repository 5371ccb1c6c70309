"""The default dtype follows the device: bf16 only where the hardware computes it (the rule of core/dtypes.py),
and the --dtype names the apps accept."""
import pytest
import torch

from minllama.core import dtypes


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given PyTorch capability and /proc/cpuinfo flags."""
    def pretend(capability: str, flags: set[str] | None):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(dtypes, "cpu_flags", lambda: flags)
        dtypes.cpu_has_native_bf16.cache_clear()
    yield pretend
    dtypes.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize("capability,flags,want", [
    ("AVX512", {"avx512f", "avx512_bf16"}, torch.bfloat16),  # Cooper Lake, Zen 4
    ("AVX512", {"avx512f", "amx_bf16", "amx_tile"}, torch.bfloat16),  # Sapphire Rapids without the flag listed
    ("AVX512", {"avx512f", "avx512bw"}, torch.float32),  # Skylake-X: AVX-512 but no bf16 arithmetic
    ("AVX2", {"avx2", "avx512_bf16"}, torch.float32),  # PyTorch told not to use AVX-512 (ATEN_CPU_CAPABILITY)
    ("AVX2", {"avx2", "fma"}, torch.float32),  # Zen 3: bf16 is emulated, ~4x slower than fp32
    ("DEFAULT", set(), torch.float32),
])
def test_cpu_default_is_bf16_only_with_bf16_arithmetic(cpu, capability, flags, want):
    cpu(capability, flags)
    assert dtypes.default_dtype("cpu") == want
    assert dtypes.resolve_dtype("auto", "cpu") == want


def test_this_machine_reads_its_own_flags():
    flags = dtypes.cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    dtypes.cpu_has_native_bf16.cache_clear()
    native = torch.backends.cpu.get_cpu_capability() == "AVX512" and bool({"avx512_bf16", "amx_bf16"} & flags)
    assert dtypes.default_dtype("cpu") == (torch.bfloat16 if native else torch.float32)


def test_other_devices_and_names():
    assert dtypes.default_dtype("mps") == torch.float32
    assert dtypes.resolve_dtype("float16") == torch.float16 and dtypes.resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int3'.*auto"):
        dtypes.resolve_dtype("int3")
