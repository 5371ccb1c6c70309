"""Fault injection, DCP checkpoints: a real checkpoint (model + AdamW state + RNG + train state) damaged in many ways;
every reader (load_checkpoint, dcp_to_model, check_checkpoint, read_config) must raise one CheckpointError or give
back exactly what was saved (train-state values other than the config are returned as written). Never another
exception, never different weights, optimizer state or RNG state. One process, no process group."""
import io
import json
import math
import os
import pickle
import random
import shutil
import struct
import time
import warnings
import zipfile
from collections import Counter

import torch

from dist_helpers import tiny_model
from minllama.core import CheckpointError, MinimalLlama
from minllama.dist import check_checkpoint, dcp_to_model, load_checkpoint, read_config, save_checkpoint

TOKENS = torch.arange(2, 26).view(2, 12)
BAD_VALUES = {"null": None, "numeric string": "64", "word": "wide", "NaN": math.nan, "inf": math.inf,
              "negative": -1, "zero": 0, "fraction": 0.5, "huge int": 2 ** 62, "huge float": 1e300, "true": True,
              "list": [64], "dict": {"v": 64}}
ALL = ("load_checkpoint", "dcp_to_model", "check_checkpoint", "read_config")
CONFIG_ONLY = {"norm_eps", "rope_theta", "rope_scaling", "max_seq_len"}  # size no tensor (as in core's suites)


def snapshot(model, opt=None) -> dict:
    snap = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    if opt is not None:
        sd = opt.state_dict()
        snap["optim"] = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                         for i, s in sd["state"].items()}
        snap["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return snap


def equal(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


class DcpSuite:
    """Every case is read by every reader; each (case, reader) outcome is counted."""

    def __init__(self, root, model, opt, saved_state):
        self.root, self.pristine = root, root / "pristine"
        self.ref = snapshot(model, opt)
        self.ref_config = model.config
        with torch.no_grad():
            self.ref_logits = model.eval()(TOKENS)
        self.ref_rng = torch.load(self.pristine / "rng" / "rank0.pt", weights_only=True)["cpu"]
        self.ref_state = saved_state
        self.counts = {r: Counter() for r in ("load_checkpoint", "dcp_to_model", "check_checkpoint", "read_config")}
        self.cases, self.defects, self.started = 0, [], time.perf_counter()
        self.case("undamaged", lambda p: None, readers=ALL)
        assert all(c["loaded identical"] == 1 for c in self.counts.values()), self.counts

    def target(self):
        path = self.root / "work" / "step_00000003"
        shutil.rmtree(path.parent, ignore_errors=True)
        shutil.copytree(self.pristine, path)
        return path

    def case(self, label, damage, readers=("load_checkpoint", "dcp_to_model")):
        """``readers``: which readers this damage concerns (all four read train_state.json; the index and the
        shards are read by the two that load tensors; only load_checkpoint restores the RNG state)."""
        path = self.target()
        damage(path)
        self.cases += 1
        for reader in readers:
            outcome = self._outcome(label, reader, path)
            self.counts[reader][outcome] += 1
            if os.environ.get("FAULT_TRACE"):
                print(f"[DCP {reader}] {outcome}: {label}", flush=True)

    def _outcome(self, label, reader, path):
        torch.manual_seed(1234)  # the RNG state before a load: a restored one must replace it exactly
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                got = self._read(reader, path)
            except CheckpointError as e:
                if not str(e).strip() or "Traceback" in str(e):
                    return self._defect(label, reader, f"unhelpful message {str(e)[:200]!r}")
                return "clear error"
            except Exception as e:  # noqa: BLE001 (any other exception type is the defect looked for)
                return self._defect(label, reader, f"{type(e).__name__}: {str(e)[:300]}")
        if caught:
            return self._defect(label, reader, f"warning: {caught[0].message}")
        return self._judge(label, reader, got)

    def _read(self, reader, path):
        if reader == "load_checkpoint":
            model = tiny_model("tiny-llama3", seed=9, n_layers=1)
            opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
            state = load_checkpoint(path, model, opt)
            return {"state": state, "snap": snapshot(model, opt), "model": model, "rng": torch.get_rng_state()}
        if reader == "dcp_to_model":
            model = dcp_to_model(path)
            return {"snap": snapshot(model), "model": model}
        if reader == "check_checkpoint":
            state = check_checkpoint(path)
            state.pop("_keys")
            return {"state": state}
        return {"config": read_config(path)}

    def _judge(self, label, reader, got):
        written = False  # a train-state value returned as the file holds it (documented)
        if "state" in got:
            state = {k: v for k, v in got["state"].items() if k != "optimizer_restored"}
            written = not equal(state, self.ref_state)
        if "config" in got:
            changed = {f for f in self.ref_config.to_dict() if f != "name"
                       and getattr(got["config"], f) != getattr(self.ref_config, f)}
            # documented: read_config checks the config against the tensors' names and shapes; whether the head
            # is tied shows only in the values, which dcp_to_model and load_checkpoint read (and check)
            if changed - CONFIG_ONLY - {"tie_embeddings"}:
                return self._defect(label, reader, f"read a config changed in {sorted(changed)}")
            return "as configured" if changed else "loaded identical"
        if "snap" not in got:
            return "train state as written" if written else "loaded identical"
        snap, model = got["snap"], got["model"]
        if reader == "load_checkpoint":
            if not torch.equal(got["rng"], self.ref_rng):
                return self._defect(label, reader, "the RNG state differs from the saved one")
            if not got["state"]["optimizer_restored"]:  # documented: the returned state says so
                if not equal(snap["model"], self.ref["model"]):
                    return self._defect(label, reader, "LOADED OTHER WEIGHTS")
                return "weights only (optimizer_restored: False)"
            if not equal(snap, self.ref):
                return self._defect(label, reader, "LOADED OTHER MODEL OR OPTIMIZER STATE")
        elif not equal(snap["model"], self.ref["model"]):
            return self._defect(label, reader, "LOADED OTHER WEIGHTS")
        with torch.no_grad():
            logits = model.eval()(TOKENS)
        changed = {f for f in self.ref_config.to_dict() if f != "name"
                   and getattr(model.config, f) != getattr(self.ref_config, f)}
        if changed - CONFIG_ONLY:
            return self._defect(label, reader, f"loaded with a changed shape-defining field {sorted(changed)}")
        if changed:  # the saved weights under the config as written
            expected = MinimalLlama(model.config)
            expected.load_state_dict(self.ref["model"])
            with torch.no_grad():
                if not torch.equal(logits, expected.eval()(TOKENS)):
                    return self._defect(label, reader, "logits differ beyond the config change")
            return "as configured"
        if not torch.equal(logits, self.ref_logits):
            return self._defect(label, reader, "same weights, other logits")
        return "train state as written" if written else "loaded identical"

    def _defect(self, label, reader, what):
        self.defects.append(f"{label} [{reader}]: {what}")
        return "DEFECT"

    def report(self):
        print(f"\nDCP: {self.cases} cases in {time.perf_counter() - self.started:.1f} s, outcomes per reader:")
        for reader, c in self.counts.items():
            print(f"  {reader}: {c['clear error']} clear errors, {c['loaded identical']} loaded identical, "
                  f"{c['train state as written']} train state as written, {c['as configured']} as configured, "
                  f"{c['weights only (optimizer_restored: False)']} weights only (optimizer_restored: False), "
                  f"0 documented warnings, {c['DEFECT']} defects")
        assert not self.defects, f"{len(self.defects)} defects:\n" + "\n".join(self.defects[:40])
        assert all(c["clear error"] >= 20 and c["loaded identical"] >= 1 and c["clear error"] < sum(c.values())
                   for c in self.counts.values()), self.counts  # every reader saw both sides


def offsets(size, rng, n, boundaries=()):
    fixed = {0, 1, 2, 7, 8, size - 1, size - 2} | {b + d for b in boundaries for d in (-1, 0, 1)}
    picked = {o for o in fixed if 0 <= o < size}
    while len(picked) < min(size, n + len(fixed)):
        picked.add(rng.randrange(size))
    return sorted(picked)


def write_bytes(name, edit):
    def damage(path):
        (path / name).write_bytes(edit((path / name).read_bytes()))
    return damage


def edit_json(keys, value=None, delete=False):
    def damage(path):
        d = json.loads((path / "train_state.json").read_text())
        node = d
        for k in keys[:-1]:
            node = node[k]
        if delete:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
        (path / "train_state.json").write_text(json.dumps(d))
    return damage


def edit_index(edit):
    """Unpickle our own (trusted) .metadata, ``edit(metadata)``, pickle it again: a well-formed index that lies."""
    def damage(path):
        md = pickle.loads((path / ".metadata").read_bytes())
        edit(md)
        (path / ".metadata").write_bytes(pickle.dumps(md))
    return damage


def index_cases(suite, md):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    tensors = [k for k, v in md.state_dict_metadata.items() if hasattr(v, "chunks") and len(v.size) == 2]
    name, optim = tensors[1], next(k for k in md.state_dict_metadata if k.startswith("optim.state."))
    entries = sorted(md.storage_data, key=lambda i: md.storage_data[i].offset)
    blob = next(i for i in entries if i.fqn == name)

    def chunk(md, **change):
        c = md.state_dict_metadata[name].chunks[0]
        md.state_dict_metadata[name].chunks[0] = ChunkStorageMetadata(
            offsets=torch.Size(change.get("offsets", c.offsets)), sizes=torch.Size(change.get("sizes", c.sizes)))

    rows, cols = md.state_dict_metadata[name].size
    cases = {
        f"{name} removed from the index": lambda m: m.state_dict_metadata.pop(name),
        f"{optim} removed from the index": lambda m: m.state_dict_metadata.pop(optim),
        "every optimizer entry removed": lambda m: [m.state_dict_metadata.pop(k) for k in list(m.state_dict_metadata)
                                                    if k.startswith("optim.")],
        f"{name} size changed": lambda m: setattr(m.state_dict_metadata[name], "size", torch.Size([rows + 1, cols])),
        f"{name} chunk shifted a row": lambda m: chunk(m, offsets=[1, 0]),
        f"{name} chunk a row short": lambda m: chunk(m, sizes=[rows - 1, cols]),
        f"{name} chunk a row long": lambda m: chunk(m, sizes=[rows + 1, cols]),
        f"{name} chunk at a negative offset": lambda m: chunk(m, offsets=[-1, 0]),
        f"{name} chunk of another rank": lambda m: chunk(m, offsets=[rows // 2, 0], sizes=[rows // 2, cols]),
        f"{name} chunk duplicated": lambda m: m.state_dict_metadata[name].chunks.append(
            m.state_dict_metadata[name].chunks[0]),
        f"{name} chunks removed": lambda m: m.state_dict_metadata[name].chunks.clear(),
        f"{name} bytes shifted by 1": lambda m: setattr(m.storage_data[blob], "offset", m.storage_data[blob].offset
                                                        + 1),
        f"{name} bytes 1 short": lambda m: setattr(m.storage_data[blob], "length", m.storage_data[blob].length - 1),
        f"{name} bytes at the previous item's": lambda m: setattr(
            m.storage_data[blob], "offset", m.storage_data[entries[entries.index(blob) - 1]].offset),
        f"{name} bytes negative": lambda m: setattr(m.storage_data[blob], "offset", -5),
        f"{name} bytes in a missing file": lambda m: setattr(m.storage_data[blob], "relative_path", "__7_0.distcp"),
        f"{name} bytes in the RNG file": lambda m: setattr(m.storage_data[blob], "relative_path", "rng/rank0.pt"),
        f"{name} bytes entry removed": lambda m: m.storage_data.pop(blob),
        "the index's storage data removed": lambda m: setattr(m, "storage_data", {}),
        "the index's tensors are a list": lambda m: setattr(m, "state_dict_metadata", []),
        f"{name} dtype float16 in the index": lambda m: setattr(m.state_dict_metadata[name].properties, "dtype",
                                                                torch.float16),
    }
    for label, edit in cases.items():
        suite.case(label, edit_index(edit))


def blob_regions(data: bytes, starts):
    """Byte positions inside the first tensor blobs of a .distcp file that are not tensor values: each blob is a
    torch.save zip (local headers, the pickle, the central directory)."""
    regions = []
    for start, end in starts[:4]:
        z = zipfile.ZipFile(io.BytesIO(data[start:end]))
        for info in z.infolist():
            h = start + info.header_offset
            nl, el = struct.unpack("<HH", data[h + 26:h + 30])
            regions.append((h, h + 30 + nl))  # the header without its padding
            if "/data/" not in info.filename:
                regions.append((h + 30 + nl + el, h + 30 + nl + el + info.compress_size))
        regions.append((start + z.start_dir, end))
    return regions


def test_damaged_dcp_checkpoints_are_clear_errors_or_load_identical(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 600 small loads: a second thread only adds contention on a shared 2-core CPU
    try:
        run_suite(tmp_path)
    finally:
        torch.set_num_threads(threads)


def run_suite(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("tiny-llama3", seed=0, n_layers=1)  # rope scaling: a nested config in train_state.json
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(2):
        model(TOKENS).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    torch.manual_seed(77)  # the RNG state the checkpoint stores
    save_checkpoint(tmp_path / "pristine", model, opt, {"step": 3, "data_position": 40, "note": "x"})
    saved_state = json.loads((tmp_path / "pristine" / "train_state.json").read_text())
    suite = DcpSuite(tmp_path, model, opt, saved_state)
    rng = random.Random(4)

    # train_state.json: every field, config fields included, of every wrong type; the file itself cut and replaced
    keys = [(k,) for k in saved_state] + [("config", k) for k in saved_state["config"]] + \
        [("config", "rope_scaling", k) for k in saved_state["config"]["rope_scaling"]]
    for k in keys:
        values = BAD_VALUES if k[0] in ("config", "step") else {w: BAD_VALUES[w] for w in ("null", "NaN", "dict")}
        for what, value in values.items():  # (the caller's own fields, like data_position, are returned as written)
            suite.case(f"{'.'.join(k)} = {what}", edit_json(k, value), readers=ALL)
        suite.case(f"{'.'.join(k)} removed", edit_json(k, delete=True), readers=ALL)
    text = (tmp_path / "pristine" / "train_state.json").read_bytes()
    for cut in offsets(len(text), rng, 8):
        suite.case(f"train_state.json cut at {cut}", write_bytes("train_state.json", lambda b, c=cut: b[:c]),
                   readers=ALL)
    for what, body in {"a list": b"[]", "null": b"null", "binary": bytes(range(256))}.items():
        suite.case(f"train_state.json is {what}", write_bytes("train_state.json", lambda b, x=body: x), readers=ALL)

    # .metadata: cut, flipped bytes (through the allow-list unpickler), and a well-formed index that lies
    data = (tmp_path / "pristine" / ".metadata").read_bytes()
    for cut in offsets(len(data), rng, 15):
        suite.case(f".metadata cut at {cut}", write_bytes(".metadata", lambda b, c=cut: b[:c]))
    for pos in offsets(len(data), rng, 50):
        for mask in (0x01, 0x80):
            suite.case(f".metadata byte {pos} ^ {mask:#x}",
                       write_bytes(".metadata", lambda b, p=pos, m=mask: b[:p] + bytes([b[p] ^ m]) + b[p + 1:]))
    md = pickle.loads(data)
    index_cases(suite, md)

    # the shard file: cut, flipped bytes in the blobs' zip structure and in the values
    shard = "__0_0.distcp"
    data = (tmp_path / "pristine" / shard).read_bytes()
    spans = sorted((i.offset, i.offset + i.length) for i in md.storage_data.values())
    for cut in offsets(len(data), rng, 12, boundaries=tuple(s for s, _ in spans[:3])):
        suite.case(f"{shard} cut at {cut}", write_bytes(shard, lambda b, c=cut: b[:c]))
    for a, b in blob_regions(data, spans):
        for pos in sorted(rng.sample(range(a, b), min(b - a, 2))):
            suite.case(f"{shard} byte {pos} ^ 0x01", write_bytes(shard, lambda d, p=pos: d[:p] + bytes([d[p] ^ 1])
                                                                 + d[p + 1:]))
    for start, end in rng.sample(spans, 6):  # inside the values: the blob's CRC-32 no longer matches
        z = zipfile.ZipFile(io.BytesIO(data[start:end]))
        info = next((i for i in z.infolist() if "/data/" in i.filename), z.infolist()[0])
        h = start + info.header_offset
        nl, el = struct.unpack("<HH", data[h + 26:h + 30])
        pos = h + 30 + nl + el + info.compress_size // 2
        suite.case(f"{shard} value byte {pos} ^ 0x40",
                   write_bytes(shard, lambda d, p=pos: d[:p] + bytes([d[p] ^ 0x40]) + d[p + 1:]))

    # the RNG state and the folder's files
    rng_file = "rng/rank0.pt"
    data = (tmp_path / "pristine" / rng_file).read_bytes()
    only_load = ("load_checkpoint",)
    for cut in offsets(len(data), rng, 6):
        suite.case(f"{rng_file} cut at {cut}", write_bytes(rng_file, lambda b, c=cut: b[:c]), readers=only_load)
    for pos in rng.sample(range(len(data)), 12):
        suite.case(f"{rng_file} byte {pos} ^ 0x01", write_bytes(rng_file, lambda d, p=pos: d[:p] + bytes([d[p] ^ 1])
                                                                + d[p + 1:]), readers=only_load)
    suite.case(f"{rng_file} holds floats", lambda p: torch.save({"cpu": torch.zeros(8)}, p / rng_file),
               readers=only_load)
    suite.case(".metadata deleted", lambda p: (p / ".metadata").unlink(), readers=ALL)
    suite.case("train_state.json deleted", lambda p: (p / "train_state.json").unlink(), readers=ALL)
    suite.case(f"{shard} deleted", lambda p: (p / shard).unlink())
    suite.case(f"{shard} is a directory", lambda p: ((p / shard).unlink(), (p / shard).mkdir()))
    suite.case("an unlisted shard added (ignored)", lambda p: (p / "__1_0.distcp").write_bytes(b"junk"))
    suite.case("a garbage journal", lambda p: (p / ".minllama-publish.json").write_text("{"), readers=ALL)
    suite.case("the folder is a file", lambda p: (shutil.rmtree(p), p.write_text("x")), readers=ALL)
    suite.report()
