"""Our torch reading of GGUF blocks equals the gguf package's (llama.cpp's) reference dequantization."""
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from minllama.quant import gguf_blocks
from quant_helpers import heavy_tailed_weight

QTYPES = ["q8_0", "q4_0", "q4_1"]


@pytest.mark.parametrize("qtype", QTYPES)
def test_block_dequantization_equals_gguf_reference(qtype):
    raw = gguf_blocks.quantize_blocks(heavy_tailed_weight(48, 160), qtype)  # llama.cpp's encoder
    assert raw.shape == (48, 160 // 32 * gguf_blocks.BLOCK_BYTES[qtype])
    ref = dequantize(raw.numpy(), gguf_blocks.ggml_type(qtype))
    assert torch.equal(gguf_blocks.dequantize_blocks(raw, qtype), torch.from_numpy(np.asarray(ref, np.float32)))


@pytest.mark.parametrize("qtype", QTYPES)
def test_int4_planes_rebuild_the_blocks(qtype):
    """The kernel's (q - 8) * s + z form of the file's codes gives back exactly the block weights."""
    raw = gguf_blocks.quantize_blocks(heavy_tailed_weight(16, 96, seed=1), qtype)
    total = 0
    for codes, s, z in gguf_blocks.int4_planes(raw, qtype):
        assert codes.min() >= 0 and codes.max() <= 15
        total = total + (codes.float() - 8) * s.repeat_interleave(32, 1) + z.repeat_interleave(32, 1)
    torch.testing.assert_close(total, gguf_blocks.dequantize_blocks(raw, qtype), rtol=1e-6, atol=1e-7)


def test_real_file_tensors_equal_reference(smollm2_reader):
    """Every Q4_1 / Q8_0 tensor kind of the embedded SmolLM2 file (first rows: the test stays fast)."""
    seen = set()
    for t in smollm2_reader.tensors:
        qtype = gguf_blocks.qtype_of(t.tensor_type)
        if qtype is None or qtype in seen:
            continue
        seen.add(qtype)
        raw = np.array(t.data[:64])
        ref = dequantize(raw, t.tensor_type)
        assert torch.equal(gguf_blocks.dequantize_blocks(torch.from_numpy(raw), qtype), torch.from_numpy(ref))
    assert seen == {"q4_1", "q8_0"}
