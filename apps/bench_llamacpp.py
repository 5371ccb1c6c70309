"""llama.cpp's rows of ``apps/bench.py``: the same model, re-encoded to llama.cpp's own formats, run by llama.cpp.

    uv run apps/bench_llamacpp.py                      # llama.cpp alone: F32, F16, Q8_0 and the shipped Q4_1
    uv run apps/bench_llamacpp.py --formats F32 --runs 1 --new-tokens 8    # a smoke run

llama.cpp is reached through the ``llama-cpp-python`` package, which is not one of our dependencies: PyPI ships it
as source only, and it builds llama.cpp with CMake and a C++ compiler (3-25 minutes on 2 cores). Install it into
the workspace's environment, from outside the workspace folder (our ``pyproject.toml`` masks it from resolution,
because the package that ships the default GGUF file names it as a dependency):

    cd /tmp && uv pip install --python "$OLDPWD/.venv/bin/python" llama-cpp-python

(``uv sync`` removes it again; ``uv run`` keeps it.) Without it, ``bench.py`` prints its rows as skipped. llama.cpp
builds for the CPU it is built on. On the development VM (which reports AMX) that build died with "Illegal
instruction" in the Q8_0 and Q4_1 rows, where llama.cpp's AMX code handles quantized weights; which instruction
was not found out, but building without AMX fixed it (the F32 and F16 rows ran either way):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
    -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF" uv pip install ... --reinstall-package llama-cpp-python

The default model ships as a Q4_1 GGUF file. For the other rows it is re-encoded with the ``gguf`` package (a core
dependency): every tensor dequantized to fp32 and written as F32, F16 or Q8_0 (1-D norm weights stay F32, as
llama.cpp's converter keeps them), with the same metadata. The files go to a cache folder and are made once.
Decode is timed as ours is: batch 1, greedy, from the first generated token to the last.
"""
from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import numpy as np

FORMATS = ("F32", "F16", "Q8_0", "Q4_1")  # Q4_1: the shipped file as it is


def llama_cpp_missing() -> str | None:
    """None when llama-cpp-python can be imported, else what to do about it."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (it builds from source: see apps/bench_llamacpp.py)"
    return None


def gguf_file(fmt: str, cache_dir: Path | None = None) -> Path:
    """The default model as a GGUF file of ``fmt``: the shipped Q4_1 file, or a re-encoding of it (made once)."""
    from minllama.core.checkpoint import default_model_path

    source = Path(default_model_path())
    if fmt == "Q4_1":
        return source
    cache_dir = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minllama" / "gguf"
    target = cache_dir / f"{source.stem.rsplit('.', 1)[0]}.{fmt}.gguf"
    if not target.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        reencode(source, target, fmt)
    return target


def reencode(source: Path, target: Path, fmt: str) -> None:
    """Write ``source``'s tensors, dequantized, as ``fmt`` (F32, F16 or Q8_0) to ``target``; same metadata.

    Written to a temporary name and renamed, so an interrupted run leaves no truncated file behind."""
    import gguf

    qtype = gguf.GGMLQuantizationType[fmt]
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    tmp = target.with_suffix(".part")
    writer = gguf.GGUFWriter(tmp, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue  # the writer writes the header and the architecture itself; the file type changes
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                          "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[fmt])
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)  # numpy order
        if values.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, values)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(tensor.name, values.astype(np.float16))
        else:
            writer.add_tensor(tensor.name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(target)


def bench_llama_cpp(fmt: str, prompt_len: int, new_tokens: int, threads: int) -> dict:
    """One format's prefill and decode speed and this process's peak RSS (run it in its own process)."""
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(str(gguf_file(fmt)), n_ctx=prompt_len + new_tokens + 8, n_threads=threads,
                          n_threads_batch=threads, n_batch=max(prompt_len, 8), verbose=False)
    load_s = time.perf_counter() - t0
    prompt = np.random.default_rng(0).integers(100, llm.n_vocab() - 100, prompt_len).tolist()

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)  # prefill: one batch
    prefill_s = time.perf_counter() - t0

    def decode() -> float:
        llm.reset()
        stream = llm.generate(prompt, temp=0.0, top_k=1, reset=True)
        next(stream)  # the first token comes from the prefill
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            next(stream)
        return (new_tokens - 1) / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    decode()  # warm-up
    warmup_s = time.perf_counter() - t0
    return dict(load_s=load_s, warmup_s=warmup_s, prefill_tok_s=prompt_len / prefill_s,
                decode_tok_s=max(decode(), decode()),
                peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    if reason := llama_cpp_missing():
        raise SystemExit(reason)
    print("| llama.cpp | prefill tok/s | decode tok/s | peak RSS MB |\n|---|---|---|---|")
    for fmt in args.formats:
        r = bench_llama_cpp(fmt, args.prompt_len, args.new_tokens, args.threads)
        print(f"| {fmt} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
