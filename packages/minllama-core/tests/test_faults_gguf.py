"""Fault injection, GGUF files (float32, and Q8_0 blocks): every damage is one CheckpointError, or a model that loads
identical (or as the metadata says, for fields that size no tensor); never another exception, never wrong weights.
Loaded without the tokenizer: these files hold none (tokenizer metadata is the tokenizer tests' business)."""
import math
import random
import struct

import gguf
import numpy as np
import pytest
import torch

from fault_helpers import FaultSuite, offsets, perturbed_model
from minllama.core.checkpoint import load_pretrained
from test_checkpoint import write_gguf

V = gguf.GGUFValueType


def load(path):
    return load_pretrained(path, with_tokenizer=False)[0]


def read(path):
    """(fields as {key: (value, type, sub type)}, tensors as [(name, data, raw type)]) of a GGUF file."""
    r = gguf.GGUFReader(path)
    fields = {}
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        sub = f.types[-1] if f.types[0] == V.ARRAY else None
        fields[f.name] = (f.contents(), f.types[0], sub)
    tensors = [(t.name, np.array(t.data), t.tensor_type) for t in r.tensors]
    return fields, tensors


def write(path, fields, tensors):
    w = gguf.GGUFWriter(str(path), "llama")
    w.kv_data[0].clear()  # general.architecture comes from ``fields`` like every other key
    for key, (value, vtype, sub) in fields.items():
        w.add_key_value(key, value, vtype, sub)
    for name, data, raw in tensors:
        w.add_tensor(name, data, raw_dtype=None if raw == gguf.GGMLQuantizationType.F32 else raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def rewrite(edit):
    """Read the file, ``edit(fields, tensors)`` (lists and dicts, in place), write it again: a well-formed GGUF
    with other contents."""
    def damage(path):
        fields, tensors = read(path)
        edit(fields, tensors)
        write(path, fields, tensors)
    return damage


def patch(edit):
    def damage(path):
        path.write_bytes(edit(path.read_bytes()))
    return damage


WRONG = {  # a metadata value of the wrong type or out of range: (value, GGUF type, array element type)
    "a string": ("64", V.STRING, None), "an empty string": ("", V.STRING, None),
    "a fraction": (64.5, V.FLOAT32, None), "a whole float": (64.0, V.FLOAT32, None),
    "NaN": (math.nan, V.FLOAT32, None), "inf": (math.inf, V.FLOAT64, None), "negative": (-1, V.INT32, None),
    "zero": (0, V.UINT32, None), "huge": (2 ** 63, V.UINT64, None), "true": (True, V.BOOL, None),
    "an int array": ([64, 64], V.ARRAY, V.INT32), "a string array": (["64"], V.ARRAY, V.STRING),
    "an int8 -128": (-128, V.INT8, None),
}


def metadata_cases(suite):
    fields, _ = read(suite.pristine)
    keys = [k for k in fields if k.startswith(("llama.", "general."))] + ["general.alignment"]
    for key in keys:
        for what, value in WRONG.items():
            suite.case(f"{key} = {what}", rewrite(lambda f, t, k=key, v=value: f.__setitem__(k, v)))
        if key in fields:
            suite.case(f"{key} removed", rewrite(lambda f, t, k=key: f.pop(k)))
            placeholder = key[:-1] + ("X" if key[-1] != "X" else "Y")  # same length: renamed below, a duplicate
            suite.case(f"{key} twice", lambda p, k=key, ph=placeholder: (
                rewrite(lambda f, t: f.__setitem__(ph, f[k]))(p),
                patch(lambda b: b.replace(ph.encode(), k.encode(), 1))(p)))
    for what, value in {"gpt2": "gpt2", "LLAMA": "LLAMA", "llama\\0": "llama\0"}.items():
        suite.case(f"general.architecture = {what}",
                   rewrite(lambda f, t, v=value: f.__setitem__("general.architecture", (v, V.STRING, None))))
    suite.case("general.name not UTF-8", lambda p: (
        rewrite(lambda f, t: f.__setitem__("general.name", ("\u00e9\u00e9", V.STRING, None)))(p),
        patch(lambda b: b.replace("\u00e9\u00e9".encode(), b"\xff\xfe", 1))(p)))


def layout(path):
    """(end of the fixed header, start of the tensor infos, start of the data) of a GGUF file."""
    r = gguf.GGUFReader(path)
    infos = min(t.field.offset for t in r.tensors)
    return 24, infos, r.data_offset


def byte_cases(suite, rng, n_cut=25, n_flip=70):
    data = suite.pristine.read_bytes()
    head, infos, start = layout(suite.pristine)
    for cut in offsets(len(data), rng, n_cut, boundaries=(head, infos, start)):
        suite.case(f"cut at {cut}", patch(lambda b, c=cut: b[:c]))
    for pos in offsets(start, rng, n_flip, boundaries=(head, infos)):
        for mask in (0x01, 0x10, 0x80, 0xFF):
            suite.case(f"header byte {pos} ^ {mask:#x}",
                       patch(lambda b, p=pos, m=mask: b[:p] + bytes([b[p] ^ m]) + b[p + 1:]))
    r = gguf.GGUFReader(suite.pristine)
    for t in rng.sample(list(r.tensors), 4):  # a NaN or an inf inside the weights (a float, or a block's scale)
        pos = t.data_offset
        for bad in (b"\xff\xff\xff\xff", struct.pack("<f", math.inf) if t.tensor_type == 0 else b"\x00\x7c"):
            suite.case(f"{t.name} data = {bad.hex()}", patch(lambda b, p=pos, x=bad: b[:p] + x + b[p + len(x):]))


def tensor_cases(suite):
    _, tensors = read(suite.pristine)
    names = [n for n, _, _ in tensors]
    q, k = "blk.0.attn_q.weight", "blk.0.attn_k.weight"
    index = {n: i for i, n in enumerate(names)}

    def put(name, data, raw=gguf.GGMLQuantizationType.F32):
        return lambda f, t: t.__setitem__(index[name], (name, data, raw))

    suite.case(f"{q} removed", rewrite(lambda f, t: t.pop(index[q])))
    suite.case("token_embd.weight removed", rewrite(lambda f, t: t.pop(index["token_embd.weight"])))
    suite.case("an unknown tensor added", rewrite(lambda f, t: t.append(("extra", np.zeros(4, np.float32),
                                                                        gguf.GGMLQuantizationType.F32))))
    suite.case(f"{k} renamed {q} (two tensors of one name)", patch(lambda b: b.replace(k.encode(), q.encode(), 1)))
    suite.case(f"{q} renamed into layer 7", patch(lambda b: b.replace(q.encode(), q.replace("0", "7").encode(), 1)))
    suite.case(f"{q} as I32", rewrite(put(q, np.zeros((64, 64), np.int32), gguf.GGMLQuantizationType.I32)))
    suite.case(f"{q} transposed shape", rewrite(put(q, np.zeros((32, 128), np.float32))))
    suite.case(f"{q} one row short", rewrite(put(q, np.zeros((63, 64), np.float32))))
    suite.case(f"{q} with one more dimension", rewrite(put(q, np.zeros((1, 64, 64), np.float32))))
    emb = next(d for n, d, _ in tensors if n == "token_embd.weight")
    if "output.weight" not in names:  # a tied head: a stored copy makes it untied, with the same numbers
        raw = next(r for n, _, r in tensors if n == "token_embd.weight")
        suite.case("output.weight stored (a copy of the embedding)",
                   rewrite(lambda f, t: t.append(("output.weight", emb.copy(), raw))))
    else:  # GGUF has no tie flag: without output.weight the embedding is the head (llama.cpp's rule too)
        def tied_otherwise_identical(model):
            ref = dict(suite.ref_state, **{"output.weight": suite.ref_state["tok_embeddings.weight"]})
            got = model.state_dict()
            return model.output.weight is model.tok_embeddings.weight and all(
                torch.equal(got[n], v) for n, v in ref.items())
        suite.case("output.weight removed: a tied model", rewrite(lambda f, t: t.pop(index["output.weight"])),
                   documented=tied_otherwise_identical)
    if "rope_freqs.weight" in names:
        freqs = next(d for n, d, _ in tensors if n == "rope_freqs.weight")
        suite.case("rope_freqs doubled", rewrite(put("rope_freqs.weight", freqs * 2)))
        suite.case("rope_freqs one short", rewrite(put("rope_freqs.weight", freqs[:-1].copy())))
        suite.case("rope_freqs one more", rewrite(put("rope_freqs.weight", np.append(freqs, freqs[-1]))))
        suite.case("rope_freqs with a NaN", rewrite(put("rope_freqs.weight", np.append(freqs[:-1], np.nan))))
        suite.case("rope_freqs of zeros", rewrite(put("rope_freqs.weight", np.zeros_like(freqs))))
        suite.case("rope_freqs as a matrix", rewrite(put("rope_freqs.weight", freqs.reshape(2, -1).copy())))
        suite.case("rope_freqs removed", rewrite(lambda f, t: t.pop(index["rope_freqs.weight"])))
    else:
        suite.case("rope_freqs of ones added", rewrite(lambda f, t: t.append(
            ("rope_freqs.weight", np.ones(8, np.float32), gguf.GGMLQuantizationType.F32))))
    r = gguf.GGUFReader(suite.pristine)  # two tensors' data offsets swapped in the header (same shape and type)
    a, b = (t for t in r.tensors if t.name in (q, "blk.0.attn_output.weight"))

    def swap(data):
        data = bytearray(data)
        for t, other in ((a, b), (b, a)):
            at = t.field.offset + sum(int(p.nbytes) for p in t.field.parts[:-1])
            data[at:at + 8] = struct.pack("<Q", other.data_offset - r.data_offset)
        return bytes(data)
    suite.case(f"{q} and attn_output swap their data offsets", patch(swap))


def quantized(src, dst):
    """The same model with every matrix in Q8_0 blocks (norms stay float32, as llama.cpp keeps them)."""
    fields, tensors = read(src)
    out = []
    for name, data, raw in tensors:
        if data.ndim == 2:
            out.append((name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                        gguf.GGMLQuantizationType.Q8_0))
        else:
            out.append((name, data, raw))
    write(dst, fields, out)
    return dst


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_damaged_gguf_files_are_clear_errors_or_load_identical(kind, tmp_path):
    if kind == "f32":  # untied, Llama 3.1 rope scaling (rope_freqs)
        pristine = write_gguf(perturbed_model("tiny-llama3"), tmp_path / "model.gguf")
    else:  # tied head, Q8_0 matrices
        pristine = quantized(write_gguf(perturbed_model("tiny-mqa"), tmp_path / "f32.gguf"), tmp_path / "model.gguf")
    reference = load(pristine)  # (Q8_0: the dequantized weights are the reference)
    suite = FaultSuite(f"GGUF {kind}", reference, pristine, load, tmp_path / "work")
    rng = random.Random(3)
    metadata_cases(suite)
    byte_cases(suite, rng)
    tensor_cases(suite)
    suite.report(min_errors=300, min_loaded=10)
