"""bench_llamacpp.py: the re-encoded GGUF files hold the shipped model's numbers (checked by reading them back with
the gguf package and by loading them with our own loader), and, where llama-cpp-python is installed, llama.cpp
runs them."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_llamacpp  # noqa: E402

gguf = pytest.importorskip("gguf")


def dequantized(path: Path) -> dict[str, np.ndarray]:
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return {fmt: bench_llamacpp.gguf_file(fmt, folder) for fmt in ("F32", "F16", "Q8_0")}


def test_reencoded_files_hold_the_shipped_numbers_in_their_format(files):
    source = dequantized(bench_llamacpp.gguf_file("Q4_1"))
    f32, f16, q8 = (dequantized(files[f]) for f in ("F32", "F16", "Q8_0"))
    assert f32.keys() == f16.keys() == q8.keys() == source.keys()
    for name, want in source.items():
        np.testing.assert_array_equal(f32[name], want)  # Q4_1 values are exact in fp32
        np.testing.assert_allclose(f16[name], want, rtol=2**-10, atol=2**-24)  # one fp16 rounding
        if want.ndim == 2:  # Q8_0: blocks of 32 sharing one step, amax / 127, stored in fp16 (relative error
            blocks = want.reshape(-1, 32)  # 2^-11): an error of half a step, plus 127 times the step's rounding
            step = np.abs(blocks).max(1, keepdims=True) / 127
            error = np.abs(q8[name].reshape(-1, 32) - blocks)
            assert (error <= step * (0.5 + 127 * 2**-11) + 1e-7).all(), name
            assert (error <= step * 0.5 + 1e-7).mean() > 0.99, name  # most blocks: within half a step
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(files["F16"]).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # 1-D norms stay F32, as llama.cpp's


def test_metadata_is_kept_and_the_file_type_is_the_new_one(files):
    before, after = gguf.GGUFReader(bench_llamacpp.gguf_file("Q4_1")), gguf.GGUFReader(files["Q8_0"])
    for key in ("llama.block_count", "llama.attention.head_count_kv", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.chat_template", "llama.rope.freq_base"):
        assert after.fields[key].contents() == before.fields[key].contents(), key
    assert after.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0


def test_our_loader_reads_the_f32_file_as_the_shipped_model(files):
    from minllama.core.checkpoint import load_pretrained

    shipped, tokenizer = load_pretrained("smollm2-135m-instruct")
    f32, _ = load_pretrained(str(files["F32"]))
    tokens = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        torch.testing.assert_close(f32(tokens), shipped(tokens), rtol=1e-5, atol=1e-5)


def test_an_interrupted_encoding_leaves_no_file(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(KeyboardInterrupt):
        bench_llamacpp.gguf_file("F16", tmp_path)
    assert not (tmp_path / "SmolLM2-135M-Instruct.F16.gguf").exists()


@pytest.mark.skipif(bench_llamacpp.llama_cpp_missing() is not None, reason="llama-cpp-python is not installed")
def test_llama_cpp_runs_the_reencoded_file_and_greedy_tokens_agree_with_ours(files, monkeypatch):
    import llama_cpp

    from minllama.core.checkpoint import load_pretrained
    from minllama.core.generate import generate

    llm = llama_cpp.Llama(str(files["F32"]), n_ctx=64, n_threads=2, verbose=False)
    model, tokenizer = load_pretrained("smollm2-135m-instruct")
    prompt = tokenizer.encode("The capital of France is")
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        theirs.append(token)
        if len(theirs) == 8:
            break
    assert generate(model, [prompt], 8)[0] == theirs  # two implementations, the same fp32 weights
    monkeypatch.setattr(bench_llamacpp, "gguf_file", lambda fmt: files[fmt])
    r = bench_llamacpp.bench_llama_cpp("F16", prompt_len=8, new_tokens=4, threads=2)
    assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["peak_mb"] > 0
