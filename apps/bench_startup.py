"""Where the start-up of a chat goes: from `python apps/chat.py --prompt hi` to its first token, phase by phase.

    uv run apps/bench_startup.py              # the embedded SmolLM2-135M-Instruct (Q4_1 GGUF), 5 runs
    uv run apps/bench_startup.py --runs 9 --dtype bfloat16

Each run is a fresh process (a warm page cache: the file was read before), timing: `import torch`, importing
minllama.core, each step of `load_pretrained` (the GGUF header, building the model on meta, converting the tensors,
the tokenizer), then the prompt's prefill up to the first token; the table shows the median of every phase and the
peak resident memory. Then the same with the `gguf` package's reader and numpy dequantization (what
`load_pretrained` did before core had its own reader), for the side-by-side. The load average is printed before
and after: a busy machine makes every number larger. Both loaders must give the same first token (greedy).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

PHASES = ["import torch", "import minllama.core", "GGUF header", "model on meta", "tensors", "tokenizer",
          "prefill to first token"]

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import minllama.core
from minllama.core import checkpoint, build, formats
from minllama.core.chat_format import chat_format_for
from minllama.core.session import ChatSession
t2 = time.perf_counter()
dtype, old_reader = getattr(torch, sys.argv[1]), sys.argv[2] == "gguf-py"
path = checkpoint.default_model_path()
marks = {}
if old_reader:  # before: gguf-py's GGUFReader (numpy views of every field) and numpy dequantization
    import gguf
    import numpy as np
    from gguf.quants import dequantize
    reader = gguf.GGUFReader(path)
    marks["GGUF header"] = time.perf_counter()
    def field(r, key, default=None):  # gguf-py's fields as Python values, as core's reader holds them
        f = r.fields.get(key)
        if f is None:
            return default
        is_str = f.types[-1] == gguf.GGUFValueType.STRING
        v = [bytes(f.parts[i]).decode() if is_str else f.parts[i][0].item() for i in f.data]
        return v if f.types[0] == gguf.GGUFValueType.ARRAY else v[0]
    class Fields:  # the interface core's readers use: .fields.get(key, default)
        def __init__(self, r): self.r, self.fields, self.tensors = r, self, r.tensors
        def get(self, key, default=None): return field(self.r, key, default)
        def __iter__(self): return iter(self.r.fields)
    fields = Fields(reader)
    cfg = formats.config_from_gguf(fields)
    with torch.device("meta"):
        model = build.MinimalLlama(cfg)
    marks["model on meta"] = time.perf_counter()
    found, _ = build.gguf_tensors(reader)
    state = {k: torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(s)).to(dtype)
             for k, (t, s) in found.items()}
    for v in state.values():
        assert bool(torch.isfinite(v).all())
    state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, assign=True)
    model.output.weight = model.tok_embeddings.weight
    model.reset_rope()
    model.eval()
    marks["tensors"] = time.perf_counter()
    from minllama.core.tokenizer import ByteLevelBPETokenizer
    tokenizer = ByteLevelBPETokenizer.from_gguf(fields)
    marks["tokenizer"] = time.perf_counter()
else:  # now: load_pretrained, its steps timed by wrapping the functions it calls
    from minllama.core import gguf_file, tokenizer as tokenizer_module
    def timed(module, name, mark):
        f = getattr(module, name)
        def wrapper(*a, **k):
            out = f(*a, **k)
            marks[mark] = time.perf_counter()
            return out
        setattr(module, name, wrapper)
    timed(gguf_file, "GGUFFile", "GGUF header")
    timed(checkpoint, "meta_model", "model on meta")
    timed(checkpoint, "_assemble", "tensors")
    timed(tokenizer_module, "tokenizer_from_gguf", "tokenizer")
    model, tokenizer = checkpoint.load_pretrained(path, dtype=dtype)
prompt = chat_format_for(tokenizer).encode_dialog(tokenizer, [{"role": "user", "content": "hi"}])
first = next(iter(ChatSession(model).stream_text(tokenizer, prompt, 1)))
t3 = time.perf_counter()
order = [t0, t1, t2, marks["GGUF header"], marks["model on meta"], marks["tensors"], marks["tokenizer"], t3]
print(json.dumps({"phases": [b - a for a, b in zip(order, order[1:])], "total": t3 - t0, "first": first,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(dtype: str, reader: str, runs: int) -> dict:
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", CHILD, dtype, reader], capture_output=True, text=True,
                             check=False)
        if out.returncode:
            raise SystemExit(f"the {reader} run failed:\n{out.stderr[-2000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"phases": [statistics.median(r["phases"][i] for r in results) for i in range(len(PHASES))],
            "total": statistics.median(r["total"] for r in results),
            "peak_mb": statistics.median(r["peak_mb"] for r in results), "first": {r["first"] for r in results}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="fresh processes per reader (default 5); medians shown")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="default float32 (chat's)")
    args = p.parse_args(argv)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs; "
          f"{args.runs} runs each, medians; SmolLM2-135M-Instruct Q4_1 -> {args.dtype}")
    now, before = run(args.dtype, "core", args.runs), run(args.dtype, "gguf-py", args.runs)
    if len(now["first"] | before["first"]) != 1:  # the same weights must give the same greedy first token
        raise SystemExit(f"the two loaders disagree: first tokens {now['first']} vs {before['first']}")
    print("\n| phase | core's reader, torch dequantization (s) | gguf-py reader, numpy dequantization (s) |")
    print("|---|---|---|")
    for name, a, b in zip(PHASES, now["phases"], before["phases"]):
        print(f"| {name} | {a:.2f} | {b:.2f} |")
    print(f"| **start to first token** | **{now['total']:.2f}** | **{before['total']:.2f}** |")
    load_now, load_before = sum(now["phases"][2:6]), sum(before["phases"][2:6])
    print(f"| (of which loading) | {load_now:.2f} | {load_before:.2f} |")
    print(f"| peak RSS MB | {now['peak_mb']:.0f} | {before['peak_mb']:.0f} |")
    print(f"\nboth give the first token {next(iter(now['first']))!r}; loading is {load_before / load_now:.1f}x "
          f"faster; load average after: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
