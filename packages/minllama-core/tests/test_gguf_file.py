"""core's GGUF reader against the gguf package's (llama.cpp's own Python reader): the same metadata, the same tensor
table, and bit-identical floats after dequantization, on the embedded SmolLM2 file and on files written here with
every value type and every tensor type the loader dequantizes itself (odd shapes), plus the numpy fallback."""
import gc
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from minllama.core.gguf_file import TYPE_SIZES, GGMLType, GGUFFile, ggml_type, to_torch

Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType


def oracle_fields(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def oracle_floats(t) -> torch.Tensor:
    return torch.from_numpy(np.asarray(dequantize(np.array(t.data), t.tensor_type), np.float32)).reshape(
        tuple(reversed(t.shape.tolist())))


def same_table(ours: GGUFFile, ref: gguf.GGUFReader) -> None:
    assert ours.fields == oracle_fields(ref)
    assert ours.data_offset == ref.data_offset and ours.size == len(ref.data)
    assert [(t.name, t.shape, t.tensor_type, t.data_offset, t.n_bytes) for t in ours.tensors] == [
        (t.name, tuple(t.shape.tolist()), t.tensor_type, t.data_offset, int(t.n_bytes)) for t in ref.tensors]


def test_the_embedded_smollm2_file_reads_as_gguf_py_reads_it(smollm2_gguf):
    ours, ref = GGUFFile(smollm2_gguf), gguf.GGUFReader(smollm2_gguf)
    same_table(ours, ref)
    assert len(ours.fields["tokenizer.ggml.tokens"]) == 49152  # a vocabulary, merges, scores: all there
    kinds = {}
    for a, b in zip(ours.tensors, ref.tensors):
        kinds.setdefault(a.tensor_type, (a, b))  # one tensor of each type (Q8_0 embedding, Q4_1, F32)
    assert set(kinds) == {Q.Q8_0, Q.Q4_1, Q.F32}
    for a, b in kinds.values():
        assert torch.equal(to_torch(a), oracle_floats(b)), a.name


def test_our_type_table_is_llama_cpps_and_the_gguf_package_is_only_needed_for_the_others(smollm2_gguf):
    for kind in GGMLType:
        assert gguf.GGMLQuantizationType[kind.name] == kind
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)] == TYPE_SIZES[kind], kind.name
    assert ggml_type(Q.IQ4_NL) == (Q.IQ4_NL, *gguf.GGML_QUANT_SIZES[Q.IQ4_NL])  # one only the gguf package knows
    with pytest.raises(ValueError):
        ggml_type(1000)
    load = ("import sys; from minllama.core.checkpoint import load_pretrained; load_pretrained(sys.argv[1]); "
            "print(sorted({'gguf', 'yaml', 'sentencepiece'} & set(sys.modules)))")
    run = subprocess.run([sys.executable, "-c", load, smollm2_gguf], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.split() == ["[]"], run.stderr  # model and tokenizer, neither package


def write(path, values: dict, tensors: dict) -> str:
    w = gguf.GGUFWriter(str(path), "llama")
    for key, (value, vtype, sub) in values.items():
        w.add_key_value(key, value, vtype, sub)
    for name, (data, raw_type) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw_type)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return str(path)


def test_every_value_type_and_dequantized_type_matches(tmp_path):
    values = {"u8": (200, V.UINT8, None), "i8": (-100, V.INT8, None), "u16": (60000, V.UINT16, None),
              "i16": (-30000, V.INT16, None), "u32": (4_000_000_000, V.UINT32, None), "i32": (-7, V.INT32, None),
              "u64": (2 ** 63 + 5, V.UINT64, None), "i64": (-2 ** 40, V.INT64, None), "f32": (0.1, V.FLOAT32, None),
              "f64": (0.1, V.FLOAT64, None), "yes": (True, V.BOOL, None), "no": (False, V.BOOL, None),
              "text": ("héllo, 世界", V.STRING, None), "empty": ("", V.STRING, None),
              "ints": ([1, -2, 3], V.ARRAY, V.INT32), "floats": ([0.5, -1.25], V.ARRAY, V.FLOAT32),
              "bools": ([True, False], V.ARRAY, V.BOOL), "words": (["a", "", "ü"], V.ARRAY, V.STRING)}
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 96)).astype(np.float32)  # 3 rows of 3 blocks: nothing is a power of two
    tensors = {"f32": (w, None), "f16": (w.astype(np.float16), None),
               "bf16": (quantize(w, Q.BF16), Q.BF16), "vector": (w[0].copy(), None)}
    for qt in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0):  # Q5_0: not one of ours, dequantized by the gguf package
        tensors[qt.name.lower()] = (quantize(w, qt), qt)
    path = write(tmp_path / "all.gguf", values, tensors)
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    same_table(ours, ref)
    assert ours.fields["u64"] == 2 ** 63 + 5 and ours.fields["words"] == ["a", "", "ü"]
    for a, b in zip(ours.tensors, ref.tensors):
        expected = oracle_floats(b)
        assert torch.equal(to_torch(a), expected), a.name
        assert torch.equal(to_torch(a, torch.bfloat16), expected.bfloat16()), a.name  # straight into bf16
        # a row at a time, each chunk's file pages released as it is done (a page shared with the next chunk is
        # read from the file again)
        assert torch.equal(to_torch(a, torch.bfloat16, chunk=96), expected.bfloat16()), a.name


def test_a_damaged_header_is_a_clear_error(tmp_path):
    path = write(tmp_path / "m.gguf", {"general.name": ("m", V.STRING, None)},
                 {"w": (np.ones((2, 32), np.float32), None)})
    data = open(path, "rb").read()
    cases = {"not GGUF": b"GGML" + data[4:], "version": data[:4] + b"\x09" + data[5:],
             "truncated": data[:40], "empty": b""}
    messages = {"not GGUF": "does not start with the bytes 'GGUF'", "version": "version 9 is not supported",
                "truncated": "truncated", "empty": "ends at byte 0"}
    for what, damaged in cases.items():
        (tmp_path / what).write_bytes(damaged)
        with pytest.raises(ValueError, match=messages[what]):
            GGUFFile(tmp_path / what)
    twice = write(tmp_path / "dup.gguf", {"k.a": ("x", V.STRING, None), "k.b": ("y", V.STRING, None)}, {})
    (tmp_path / "dup2.gguf").write_bytes(open(twice, "rb").read().replace(b"k.b", b"k.a"))
    with pytest.raises(ValueError, match="'k.a' appears twice"):
        GGUFFile(tmp_path / "dup2.gguf")


def test_string_arrays_are_checked_on_open_and_decoded_when_read(tmp_path):
    """An array of strings is decoded when read (a vocabulary: by the tokenizer, after the weights): every length is
    checked when the file opens, and a string that is not UTF-8 is an error naming it when the array is read."""
    words = ["a", "\u00e9\u00e9", "", "z" * 300]
    path = write(tmp_path / "s.gguf", {"words": (words, V.ARRAY, V.STRING)}, {})
    read = GGUFFile(path).fields["words"]
    assert (list(read), read[1], read[-1], read[1:3], len(read)) == (words, words[1], words[-1], words[1:3], 4)
    data = open(path, "rb").read()
    (tmp_path / "bad.gguf").write_bytes(data.replace("\u00e9\u00e9".encode(), b"\xff\xfe\xff\xfe", 1))
    bad = GGUFFile(tmp_path / "bad.gguf").fields["words"]
    assert bad[0] == "a" and bad[3] == "z" * 300
    for read_all in (list, lambda b: b[1], lambda b: [*b]):
        with pytest.raises(ValueError, match="string 1 of the array at byte [0-9]+ is not UTF-8"):
            read_all(bad)
    at = data.index(b"z" * 300) - 8  # the last string's length: one byte too long runs past the end of the file
    (tmp_path / "long.gguf").write_bytes(data[:at] + (301).to_bytes(8, "little") + data[at + 8:at + 308])
    with pytest.raises(ValueError, match="truncated"):
        GGUFFile(tmp_path / "long.gguf")


def mapped(path) -> bool:
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(str(path)) for line in f)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_the_file_is_unmapped_as_soon_as_the_reader_and_its_tensors_are_dropped(smollm2_gguf):
    # No reference cycle between the file and its tensors: plain reference counting unmaps the file (its pages read
    # so far count in the process's memory), without waiting for a pass of the garbage collector (turned off here).
    from minllama.core.tokenizer import tokenizer_from_gguf

    gc.disable()
    try:
        reader = GGUFFile(smollm2_gguf)
        first = to_torch(reader.tensors[0])
        assert mapped(smollm2_gguf)
        del reader
        assert not mapped(smollm2_gguf) and first.isfinite().all()  # the tensor read is a copy: still valid
        tokenizer = tokenizer_from_gguf(smollm2_gguf)  # opens the file itself
        assert not mapped(smollm2_gguf) and tokenizer.encode("hi")
    finally:
        gc.enable()
