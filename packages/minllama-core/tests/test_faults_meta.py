"""Fault injection, Meta folders (params.json + consolidated.*.pth, one file or model-parallel shards): every damage is
one CheckpointError, or a model that loads identical (or as params.json says, for fields that size no tensor)."""
import json
import random
import struct
import zipfile

import pytest
import torch

from fault_helpers import FaultSuite, offsets, perturbed_model
from minllama.core.checkpoint import load_pretrained, save_meta
from minllama.core.formats import config_to_meta
from test_checkpoint import split_meta
from test_faults_hf import config_cases, write_bytes


def load(path):
    return load_pretrained(path, with_tokenizer=False)[0]


def zip_regions(data: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges of a torch.save zip that describe the tensors rather than hold their values: the pickle, the small
    records (version, byte order, alignment), every local file header, the central directory."""
    import io
    z = zipfile.ZipFile(io.BytesIO(data))
    regions, ends = {}, []
    for info in z.infolist():
        start = info.header_offset
        name_len, extra_len = struct.unpack("<HH", data[start + 26:start + 30])
        body = start + 30 + name_len + extra_len
        regions[f"header of {info.filename}"] = (start, body)
        if not info.filename.split("/")[-2:-1] == ["data"]:  # the pickle and the small records, not tensor bytes
            regions[info.filename] = (body, body + info.compress_size)
        ends.append(body + info.compress_size)
    regions["central directory"] = (max(ends), len(data))
    return regions


def rewrite(name, edit):
    """torch.load the shard, ``edit(state)``, torch.save it again: a valid file with other contents."""
    def damage(path):
        state = torch.load(path / name, weights_only=True)
        edit(state)
        torch.save(state, path / name)
    return damage


def pth_byte_cases(suite, name, rng, n_cut=12, per_region=4):
    data = (suite.pristine / name).read_bytes()
    regions = zip_regions(data)
    for cut in offsets(len(data), rng, n_cut, boundaries=tuple(a for a, _ in regions.values())):
        suite.case(f"{name} cut at {cut}", write_bytes(name, lambda b, c=cut: b[:c]))
    for region, (a, b) in regions.items():
        if b <= a:
            continue
        positions = sorted(rng.sample(range(a, b), min(b - a, per_region * (3 if "pkl" in region else 1))))
        for pos in positions:
            for mask in (0x01, 0x10) if "pkl" in region else (0x01,):
                suite.case(f"{name}: {region} byte {pos} ^ {mask:#x}",
                           write_bytes(name, lambda d, p=pos, m=mask: d[:p] + bytes([d[p] ^ m]) + d[p + 1:]))


def tensor_cases(suite, name):
    state = torch.load(suite.pristine / name, weights_only=True)
    key = "layers.0.attention.wk.weight"  # not square: its transpose is a shape error, not other values
    other = "layers.0.attention.wv.weight"
    cases = {
        f"{key} removed": lambda s: s.pop(key),
        "an unknown tensor added": lambda s: s.update(extra=torch.zeros(3)),
        "rope.freqs added (ignored by design)": lambda s: s.update({"rope.freqs": torch.zeros(8)}),
        f"{key} renamed": lambda s: s.update({key.replace("layers.0", "layers.5"): s.pop(key)}),
        f"{key} as int32": lambda s: s.update({key: s[key].to(torch.int32)}),
        f"{key} as bool": lambda s: s.update({key: s[key] > 0}),
        f"{key} holds a NaN": lambda s: s[key].view(-1).__setitem__(5, float("nan")),
        f"{key} holds an inf": lambda s: s[key].view(-1).__setitem__(5, float("inf")),
        f"{key} transposed": lambda s: s.update({key: s[key].t().contiguous()}),
        f"{key} stored as {other}": lambda s: s.update({other: s[key]}),
        f"{key} one row short": lambda s: s.update({key: s[key][:-1].clone()}),
        f"{key} with one more dimension": lambda s: s.update({key: s[key].unsqueeze(0)}),
        f"{key} stored transposed (a strided view, same values)": lambda s: s.update({key: s[key].t().clone().t()}),
        f"{key} a view of a larger storage (same values)": lambda s: s.update(
            {key: torch.cat([s[key].view(-1), torch.zeros(7)])[:s[key].numel()].view(s[key].shape)}),
        f"{key} with overlapping strides": lambda s: s.update({key: s[key].as_strided(s[key].shape, (1, 1))}),
        f"{key} broadcast from one row": lambda s: s.update({key: s[key][:1].expand(s[key].shape)}),
        f"{key} as a list": lambda s: s.update({key: s[key].tolist()}),
        f"{key} as a string": lambda s: s.update({key: "weights"}),
        f"{key} as None": lambda s: s.update({key: None}),
        f"{key} as a dict": lambda s: s.update({key: {"w": s[key]}}),
        f"{key} float64 (same values)": lambda s: s.update({key: s[key].double()}),
        "tok_embeddings.weight removed": lambda s: s.pop("tok_embeddings.weight"),
        "output.weight removed": lambda s: s.pop("output.weight", None),
        "output.weight the embedding (tied)": lambda s: s.update({"output.weight": s["tok_embeddings.weight"]}),
        "output.weight a copy of the embedding": lambda s: s.update(
            {"output.weight": s["tok_embeddings.weight"].clone()}),
        "everything removed": lambda s: s.clear(),
    }
    if key not in state:
        return
    for label, edit in cases.items():
        suite.case(f"{name}: {label}", rewrite(name, edit))
    for what, value in {"a list": [1, 2], "a tensor": torch.zeros(3), "a string": "model", "None": None,
                        "an int": 7}.items():
        suite.case(f"{name} holds {what}", lambda p, v=value: torch.save(v, p / name))


def write_model_parallel(model, folder, n=2):
    """Meta's layout for n model-parallel ranks (Llama 2 style: vocab_size -1, embedding split on dim 1)."""
    folder.mkdir()
    params = config_to_meta(model.config)
    params["vocab_size"] = -1
    (folder / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(split_meta(model.state_dict(), n, 1)):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")


@pytest.mark.parametrize("layout", ["single", "model-parallel"])
def test_damaged_meta_checkpoints_are_clear_errors_or_load_identical(layout, tmp_path):
    if layout == "single":  # tied head (output.weight shares the embedding's storage), as save_meta writes it
        model = perturbed_model("tiny-mqa")
        save_meta(model, tmp_path / "pristine")
    else:  # untied, Llama 3.1 rope scaling in params.json, 2 shards
        model = perturbed_model("tiny-llama3")
        write_model_parallel(model, tmp_path / "pristine")
    suite = FaultSuite(f"Meta {layout}", model, tmp_path / "pristine", load, tmp_path / "work")
    rng = random.Random(2)
    # (the fields both layouts share are swept once, in the single layout; the model-parallel one sweeps its own)
    config_cases(suite, "params.json", only=None if layout == "single" else {
        "vocab_size", "use_scaled_rope", "rope_scaling_factor", "high_freq_factor", "original_max_seq_len",
        "n_kv_heads", "ffn_dim_multiplier", "multiple_of"})
    files = sorted(p.name for p in (tmp_path / "pristine").glob("consolidated.*.pth"))
    pth_byte_cases(suite, files[0], rng)
    tensor_cases(suite, files[0])
    suite.case(f"{files[0]} deleted", lambda p: (p / files[0]).unlink())
    suite.case(f"{files[0]} is a directory", lambda p: ((p / files[0]).unlink(), (p / files[0]).mkdir()))
    n = len(files)
    suite.case(f"a copy of {files[0]} as shard {n}", lambda p: (p / f"consolidated.{n:02d}.pth").write_bytes(
        (p / files[0]).read_bytes()))
    suite.case("a gap in the shard numbers", lambda p: (p / f"consolidated.{n + 1:02d}.pth").write_bytes(
        (p / files[0]).read_bytes()))
    suite.case("a shard with another name", lambda p: (p / "consolidated.xx.pth").write_bytes(b"x"))
    suite.case("a shard that is not a zip", lambda p: (p / files[-1]).write_bytes(b"PK\x03\x04" + b"\0" * 40))
    if n > 1:
        other = perturbed_model("tiny-llama3", seed=5)
        write_model_parallel(other, tmp_path / "other")
        suite.case(f"{files[1]} from another model", lambda p: (p / files[1]).write_bytes(
            (tmp_path / "other" / files[1]).read_bytes()))
        suite.case(f"{files[-1]} deleted", lambda p: (p / files[-1]).unlink())
        suite.case(f"{files[1]} missing a tensor", rewrite(files[1], lambda s: s.pop("norm.weight")))
        suite.case(f"{files[1]} with a replicated norm changed", rewrite(
            files[1], lambda s: s["norm.weight"].view(-1).__setitem__(0, 3.0)))
    suite.report(min_errors=200, min_loaded=10)
