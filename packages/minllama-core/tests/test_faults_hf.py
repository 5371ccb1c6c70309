"""Fault injection, HF safetensors folders: every damage is one CheckpointError, or a model that loads identical (or
as its config says, for fields that size no tensor); never another exception, never wrong weights."""
import json
import random
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from fault_helpers import BAD_VALUES, FaultSuite, offsets, perturbed_model
from minllama.core.checkpoint import load_pretrained, save_hf

INDEX = "model.safetensors.index.json"
WARN_OK = r"ignoring .*which model\.safetensors\.index\.json does not list"  # documented: stray shards are skipped


def load(path):
    return load_pretrained(path, with_tokenizer=False)[0]


def edit_json(name, edit):
    def damage(path):
        d = json.loads((path / name).read_text())
        d = edit(d)
        (path / name).write_text(json.dumps(d))  # (NaN and inf are written as Python's json writes them)
    return damage


def set_key(keys, value):
    def edit(d):
        node = d
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
        return d
    return edit


def del_key(keys):
    def edit(d):
        node = d
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
        return d
    return edit


def write_bytes(name, edit):
    def damage(path):
        f = path / name
        f.write_bytes(edit(f.read_bytes()))
    return damage


def header_size(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def rewrite_shard(name, edit):
    """Rewrite one safetensors file through load_file/save_file after ``edit(tensors)`` (a valid file, other
    contents)."""
    def damage(path):
        tensors = load_file(str(path / name))
        edit(tensors)
        save_file(tensors, str(path / name), metadata={"format": "pt"})
    return damage


def config_cases(suite, path_name="config.json", only=None):
    """Every field (``only``: those named) set to every BAD_VALUE and removed; the whole file cut and replaced."""
    config = json.loads((suite.pristine / path_name).read_text())
    keys = [(k,) for k in config] + [("rope_scaling", k) for k in (config.get("rope_scaling") or {})]
    keys = [k for k in keys if only is None or k[-1] in only]
    for keys_ in keys:
        for what, value in BAD_VALUES.items():
            suite.case(f"{'.'.join(keys_)} = {what}", edit_json(path_name, set_key(keys_, value)))
        suite.case(f"{'.'.join(keys_)} removed", edit_json(path_name, del_key(keys_)))
    text = (suite.pristine / path_name).read_bytes()
    rng = random.Random(0)
    for cut in offsets(len(text), rng, 12):
        suite.case(f"{path_name} cut at {cut}", write_bytes(path_name, lambda b, c=cut: b[:c]))
    for what, body in {"a list": b"[1, 2]", "null": b"null", "empty": b"", "binary": bytes(range(256)),
                       "utf-16": json.dumps(config).encode("utf-16"), "a string": b'"llama"'}.items():
        suite.case(f"{path_name} is {what}", write_bytes(path_name, lambda b, body=body: body))
    key = next(k for k, v in config.items() if type(v) is int and v > 1)
    dup = json.dumps(config)[:-1] + f', "{key}": {config[key] // 2}}}'  # a duplicated key: the last one wins in JSON
    suite.case(f"{path_name} with {key} twice", write_bytes(path_name, lambda b: dup.encode()))


def safetensors_byte_cases(suite, name, rng, n_cut=20, n_flip=60):
    data = (suite.pristine / name).read_bytes()
    head = header_size(data)
    for cut in offsets(len(data), rng, n_cut, boundaries=(8, head)):
        suite.case(f"{name} cut at {cut}", write_bytes(name, lambda b, c=cut: b[:c]))
    for pos in offsets(head, rng, n_flip):
        for mask in (0x01, 0x20, 0xFF):
            suite.case(f"{name} header byte {pos} ^ {mask:#x}",
                       write_bytes(name, lambda b, p=pos, m=mask: b[:p] + bytes([b[p] ^ m]) + b[p + 1:]))
        for char in b'"0,}':
            if data[pos] == char:
                continue  # not a change
            suite.case(f"{name} header byte {pos} = {chr(char)!r}",
                       write_bytes(name, lambda b, p=pos, c=char: b[:p] + bytes([c]) + b[p + 1:]))
    for pos in rng.sample(range(head, len(data) - 4, 4), 4):  # a NaN / an inf inside the weights
        for bad in (b"\xff\xff\xff\xff", struct.pack("<f", float("inf"))):
            suite.case(f"{name} weights at {pos} = {bad.hex()}",
                       write_bytes(name, lambda b, p=pos, x=bad: b[:p] + x + b[p + 4:]))


def tensor_cases(suite, shards):
    """Add, remove, duplicate, rename and reshape tensors; ``shards``: file -> its tensor names."""
    first, *others = sorted(shards)
    name = sorted(shards[first])[0]
    other_name = sorted(shards[others[0]])[0] if others else None
    with_index = (suite.pristine / INDEX).is_file()

    def relist(path, edit):
        if with_index:
            edit_json(INDEX, edit)(path)

    def remove(t):
        del t[name]
    suite.case(f"{name} removed from {first}", rewrite_shard(first, remove))
    suite.case("an unknown tensor added", rewrite_shard(first, lambda t: t.update(extra=torch.zeros(3))))
    suite.case("an unknown tensor added and listed", lambda p: (
        rewrite_shard(first, lambda t: t.update(extra=torch.zeros(3)))(p),
        relist(p, lambda d: (d["weight_map"].update(extra=first), d)[1])))
    suite.case("rotary inv_freq added and listed (ignored by design)", lambda p: (
        rewrite_shard(first, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))(p),
        relist(p, lambda d: (d["weight_map"].update({"model.layers.0.self_attn.rotary_emb.inv_freq": first}), d)[1])))
    if other_name:
        suite.case(f"{other_name} stored twice (also in {first})", lambda p: rewrite_shard(
            first, lambda t: t.update({other_name: load_file(str(p / others[0]))[other_name]}))(p))
        suite.case(f"{first} and {others[0]} swapped", lambda p: (
            (p / first).rename(p / "tmp"), (p / others[0]).rename(p / first), (p / "tmp").rename(p / others[0])))
    rename_to = name.replace("layers.0.", "layers.7.") if "layers.0." in name else name + "x"
    suite.case(f"{name} renamed", rewrite_shard(first, lambda t: t.update({rename_to: t.pop(name)})))
    for what, make in {"int32": lambda v: v.to(torch.int32), "transposed shape": lambda v: v.t().contiguous()
                       if v.dim() == 2 else v.unsqueeze(0), "one more dim": lambda v: v.unsqueeze(0),
                       "a scalar": lambda v: v.sum(), "one row short": lambda v: v[:-1].contiguous(),
                       "float64 (same values)": lambda v: v.double()}.items():
        suite.case(f"{name} as {what}", rewrite_shard(first, lambda t, m=make: t.update({name: m(t[name])})))


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_damaged_hf_checkpoints_are_clear_errors_or_load_identical(layout, tmp_path):
    if layout == "sharded":  # untied, Llama 3.1 rope scaling (nested config), 5 shards + index
        model = perturbed_model("tiny-llama3")
        save_hf(model, tmp_path / "pristine", max_shard_bytes=40_000)
    else:  # tied head, one model.safetensors
        model = perturbed_model("tiny-mqa")
        save_hf(model, tmp_path / "pristine")
    suite = FaultSuite(f"HF {layout}", model, tmp_path / "pristine", load, tmp_path / "work", warn_ok=WARN_OK)
    rng = random.Random(1)
    config_cases(suite)
    files = sorted(p.name for p in (tmp_path / "pristine").glob("*.safetensors"))
    shards = {f: list(load_file(str(tmp_path / "pristine" / f))) for f in files}
    for f in files[:2]:
        safetensors_byte_cases(suite, f, rng, n_flip=30 if layout == "sharded" else 50)
    tensor_cases(suite, shards)
    stray = "model-00009-of-00009.safetensors" if layout == "sharded" else "model-extra.safetensors"
    suite.case(f"{files[0]} deleted", lambda p: (p / files[0]).unlink())
    suite.case(f"{files[0]} is a directory", lambda p: ((p / files[0]).unlink(), (p / files[0]).mkdir()))
    suite.case(f"a stray copy of {files[0]}", lambda p: (p / stray).write_bytes((p / files[0]).read_bytes()))
    suite.case("a stray file of other tensors", lambda p: save_file({"extra": torch.zeros(2)}, str(p / stray)))
    suite.case("a stray file that is not safetensors", lambda p: (p / stray).write_bytes(b"junk"))
    if layout == "sharded":
        weight_map = json.loads((tmp_path / "pristine" / INDEX).read_text())["weight_map"]
        tensor = sorted(weight_map)[0]
        for what, value in {"../outside.safetensors": "../outside.safetensors", "/etc/passwd": "/etc/passwd",
                            "sub/../../x.safetensors": "sub/../../x.safetensors", "a missing file": "nope.safetensors",
                            "another shard": files[-1] if weight_map[tensor] != files[-1] else files[0],
                            **{k: v for k, v in BAD_VALUES.items() if not isinstance(v, str)}}.items():
            suite.case(f"index: {tensor} -> {what}", edit_json(INDEX, set_key(("weight_map", tensor), value)))
        suite.case(f"index: {tensor} unlisted", edit_json(INDEX, del_key(("weight_map", tensor))))
        suite.case("index: a tensor no shard holds", edit_json(INDEX, set_key(("weight_map", "ghost"), files[0])))
        for what, value in {**BAD_VALUES, "empty": {}}.items():
            suite.case(f"index: weight_map = {what}", edit_json(INDEX, set_key(("weight_map",), value)))
        suite.case("index: no weight_map", edit_json(INDEX, del_key(("weight_map",))))
        text = (tmp_path / "pristine" / INDEX).read_bytes()
        for cut in offsets(len(text), rng, 10):
            suite.case(f"index cut at {cut}", write_bytes(INDEX, lambda b, c=cut: b[:c]))
        suite.case("index is a list", write_bytes(INDEX, lambda b: b"[]"))
        suite.case("index deleted (the shards then load without it)", lambda p: (p / INDEX).unlink())
    else:
        suite.case("a garbage index added", lambda p: (p / INDEX).write_bytes(b"{not json"))
        suite.case("an index listing another file", lambda p: (p / INDEX).write_text(json.dumps(
            {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}})))
    suite.report(min_errors=200, min_loaded=20)
