"""Fault injection for load_adapter: real adapters (saved by save_adapter), damaged in many ways (truncated at many
offsets, header bytes flipped, same-size dtypes swapped in the header, every adapter_config.json field given every
wrong type and range or removed, tensors added, removed, duplicated, reshaped, retyped, filled with NaN/Inf, files
missing or replaced). Each damaged adapter must either raise AdapterError (naming the file) or load an adapter whose
logits equal the undamaged one's, bit for bit; never another exception, never an adapter that computes something
else, and a refused adapter leaves the model untouched. The counts are printed (run with -s to see them)."""
import copy
import json
import math
import random
import shutil
import struct

import pytest
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from minllama.peft import AdapterError, LoraConfig, apply_lora, load_adapter, read_adapter_config, save_adapter
from peft_helpers import HF_TARGETS, randomize_adapter, tiny_model, tokens

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
SETTINGS = "minllama.peft"  # the metadata key of adapter_model.safetensors that holds the copy of the settings
WRONG_VALUES = [None, "x", "", "01", math.nan, math.inf, -1, 0, 10 ** 12, 1e300, 2.5, True, False, [], [1], [0, 0],
                {}, {"x": 1}]
# Without the copy (an adapter saved by HF peft, or by an earlier version), a valid but different number in these
# fields cannot be told from the original: the adapter loads and computes something else. The README says so, and
# the suite counts these cases (and fp32 tensors re-stored as fp16/bf16) as "loaded different (documented)".
UNPROTECTED_WITHOUT_COPY = ("lora_alpha", "use_rslora")


def sorted_metadata(data: bytes) -> bytes:
    """The same file with its header's metadata in sorted order: safetensors writes that map in no fixed order, so
    the byte positions the suite damages (and its counts) would change from run to run."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


class Faults:
    """One saved adapter, kept in memory; ``case`` writes a damaged copy into one folder and loads it."""

    def __init__(self, base, cfg, folder, copy_settings=True):
        self.base = base
        model = copy.deepcopy(base)
        apply_lora(model, cfg)
        randomize_adapter(model)
        save_adapter(model, folder)
        self.folder = folder
        self.original = {name: (folder / name).read_bytes() for name in (CONFIG, WEIGHTS)}
        self.original[WEIGHTS] = sorted_metadata(self.original[WEIGHTS])
        self.tensors, self.metadata = self.read_weights(self.original[WEIGHTS])
        if not copy_settings:
            self.metadata.pop(SETTINGS)
            self.original[WEIGHTS] = save_bytes(self.tensors, self.metadata)
        self.config = json.loads(self.original[CONFIG])
        self.header_len = struct.unpack("<Q", self.original[WEIGHTS][:8])[0]
        self.ids = tokens(base, batch=1, length=6)
        self.reference = self.load_and_run({})
        with torch.no_grad():
            assert torch.equal(self.reference, model(self.ids))  # the undamaged adapter round-trips exactly
        self.base_modules = [n for n, _ in base.named_modules()]
        self.counts = {"cases": 0, "clear error": 0, "loaded identical": 0, "loaded different (documented)": 0}
        self.problems = []

    @staticmethod
    def read_weights(data: bytes):
        header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
        tensors = load_bytes(data)
        return {k: tensors[k] for k in sorted(tensors)}, dict(header.get("__metadata__", {}))

    def run(self, model):
        with torch.no_grad():
            return model(self.ids)

    def write(self, files: dict):
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir()
        for name, content in {**self.original, **files}.items():
            if content == "dir":
                (self.folder / name).mkdir()
            elif content is not None:
                (self.folder / name).write_bytes(content)

    def load_and_run(self, files: dict, model=None):
        self.write(files)
        model = model if model is not None else copy.deepcopy(self.base)
        load_adapter(model, self.folder)
        return self.run(model)

    def case(self, label: str, files: dict, may_differ: bool = False) -> str:
        self.counts["cases"] += 1
        model = copy.deepcopy(self.base)
        try:
            out = self.load_and_run(files, model)
        except AdapterError as e:
            if not any(name in str(e) for name in (CONFIG, WEIGHTS, str(self.folder))):
                self.problems.append(f"{label}: the error names no file: {e}")
            if [n for n, _ in model.named_modules()] != self.base_modules:
                self.problems.append(f"{label}: refused, but the model was changed")
            self.counts["clear error"] += 1
            return "error"
        except Exception as e:  # noqa: BLE001 - exactly what must never happen
            self.problems.append(f"{label}: {type(e).__name__}: {str(e)[:200]}")
            return "other"
        if torch.equal(out, self.reference):
            self.counts["loaded identical"] += 1
            return "identical"
        if may_differ:
            self.counts["loaded different (documented)"] += 1
            return "different"
        self.problems.append(f"{label}: loaded, but computes something else")
        return "different"

    def check(self, name: str, capsys):
        with capsys.disabled():
            print(f"\n{name}: " + ", ".join(f"{v} {k}" for k, v in self.counts.items()))
        assert not self.problems, "\n".join(self.problems[:20])

    # ------------------------------------------------------------------------------------------ the damages
    def truncations(self, name: str, offsets):
        data = self.original[name]
        for n in sorted(set(o for o in offsets if 0 <= o < len(data))):
            self.case(f"{name} cut to {n} bytes", {name: data[:n]})

    def header_flips(self, n_positions: int, rng: random.Random):
        data = self.original[WEIGHTS]
        end = 8 + self.header_len
        for pos in list(range(8)) + rng.sample(range(8, end), min(n_positions, end - 8)):
            bit = 1 << rng.randrange(8)
            flipped = bytearray(data)
            flipped[pos] ^= bit
            self.case(f"{WEIGHTS} byte {pos} ^ {bit:#x}", {WEIGHTS: bytes(flipped)})

    def header_dtype_swaps(self):
        """F32 -> I32/U32 in the header: the file stays consistent, only the loader's dtype check sees it."""
        data = self.original[WEIGHTS]
        header = json.loads(data[8:8 + self.header_len])
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            for new in {"F32": ["I32", "U32"], "F16": ["I16", "BF16"], "BF16": ["F16"]}.get(entry["dtype"], []):
                text = json.dumps({**header, name: {**entry, "dtype": new}}).encode()
                text += b" " * (-len(text) % 8)
                body = struct.pack("<Q", len(text)) + text + data[8 + self.header_len:]
                self.case(f"{name} {entry['dtype']} -> {new} in the header", {WEIGHTS: body})

    def json_fields(self):
        """Every field of adapter_config.json: removed, and replaced by every wrong value."""
        for key in list(self.config):
            paths = [(key,)] + [(key, i) for i in range(len(self.config[key]))] \
                if isinstance(self.config[key], list) else [(key,)]
            for path in paths:
                original = self.get(path)
                for value in [DELETE] + WRONG_VALUES:
                    if value is not DELETE and json.dumps(value) == json.dumps(original):
                        continue
                    if value is DELETE and len(path) > 1:
                        continue
                    edited = json.loads(json.dumps(self.config))
                    parent = edited if len(path) == 1 else edited[path[0]]
                    if value is DELETE:
                        del parent[path[-1]]
                    else:
                        parent[path[-1]] = value
                    label = f"{CONFIG} {'.'.join(map(str, path))} = {value!r}"
                    self.case(label, {CONFIG: json.dumps(edited).encode()},
                              may_differ=path[0] in UNPROTECTED_WITHOUT_COPY and SETTINGS not in self.metadata)
        text = self.original[CONFIG].decode()
        targets = self.config["target_modules"]
        ours = {hf: our for our, hf in {**HF_TARGETS, "output": "lm_head"}.items()}
        for label, value in [("a regex of the same layers", "|".join(targets)), ("a regex of every layer", ".*"),
                             ("a broken regex", "q_proj("), ("a regex matching nothing", "^nothing$"),
                             ("the HF name of no Llama layer", ["embed_tokens"]),
                             ("a name twice", targets + targets[:1]), ("our names", [ours[t] for t in targets])]:
            self.case(f"{CONFIG} target_modules {label}", {CONFIG: json.dumps({**self.config,
                                                                               "target_modules": value}).encode()})
        for label, content in [
            ("empty", b""), ("not UTF-8", b"\xff\xfe" + text.encode()), ("a list", b"[1]"), ("null", b"null"),
            ("deeply nested", b"[" * 100000 + b"]" * 100000), ("a directory", "dir"), ("missing", None),
            ("a key twice", text.replace('"r": ', '"r": 4, "r": ', 1).encode()),
            ("an extra field", text.replace('"r": ', '"notes": "mine", "r": ', 1).encode()),
        ]:
            self.case(f"{CONFIG} {label}", {CONFIG: content})
        for label, content in [("empty", b""), ("a directory", "dir"), ("missing", None), ("8 zero bytes", b"\0" * 8),
                               ("the config's bytes", self.original[CONFIG]),
                               ("a huge header length", struct.pack("<Q", 2 ** 62) + b"{}")]:
            self.case(f"{WEIGHTS} {label}", {WEIGHTS: content})

    def get(self, path):
        value = self.config
        for k in path:
            value = value[k]
        return value

    def tensor_edits(self, rng: random.Random):
        tensors, metadata = self.tensors, self.metadata
        names = list(tensors)

        def case(label, edited):
            self.case(label, {WEIGHTS: save_bytes(edited, metadata)})

        for name in sorted({names[0], names[-1], *rng.sample(names, min(6, len(names)))}):
            t = tensors[name]
            case(f"{name} removed", {k: v for k, v in tensors.items() if k != name})
            twice = name.replace(".weight", ".default.weight") if name.endswith(".weight") else name + ".default"
            case(f"{name} stored twice", {**tensors, twice: t.clone()})  # peft's in-memory name, say
            moved = name.replace("layers.0.", "layers.1.") if "layers.0." in name else name.replace("layers.1.",
                                                                                                 "layers.0.")
            if moved != name:  # onto a tensor of the other layer (which is dropped): the same names, other places
                case(f"{name} under the other layer", {**{k: v for k, v in tensors.items() if k not in (name, moved)},
                                                       moved: t})
            for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int32):
                # HF adapters are often stored in fp16/bf16: they load, converted to the model's dtype; storing
                # fp32 values in fewer bits rounds them, so that adapter computes (slightly) otherwise
                self.case(f"{name} as {dtype}", {WEIGHTS: save_bytes({**tensors, name: t.to(dtype)}, metadata)},
                          may_differ=dtype in (torch.float16, torch.bfloat16))
            for label, changed in [("transposed", t.T.contiguous() if t.ndim == 2 else None),
                                   ("flattened", t.reshape(-1) if t.ndim > 1 else None),
                                   ("one row less", t[:-1].contiguous()), ("one row more", torch.cat([t, t[:1]])),
                                   ("a dimension more", t[None])]:
                if changed is not None and changed.shape != t.shape:
                    case(f"{name} {label} {tuple(changed.shape)}", {**tensors, name: changed})
            for bad in (math.nan, math.inf, -math.inf):
                poisoned = t.clone()
                poisoned.view(-1)[rng.randrange(t.numel())] = bad
                case(f"{name} with a {bad}", {**tensors, name: poisoned})
        case("an extra tensor", {**tensors, "base_model.model.model.layers.0.mlp.up_proj.lora_C.weight":
                                 torch.zeros(3)})
        case("a peft base_layer copy (ignored)", {**tensors, "base_model.model.lm_head.base_layer.weight":
                                                  torch.zeros(4, 4)})
        case("a tensor of a layer that does not exist",
             {**tensors, names[0].replace("layers.0.", "layers.7.").replace("layers.1.", "layers.7."):
              tensors[names[0]].clone()})
        case("no tensors", {})
        self.case("the settings copy removed (as HF peft saves)", {WEIGHTS: save_bytes(tensors, {"format": "pt"})})
        self.case("the settings copy not JSON", {WEIGHTS: save_bytes(tensors, {**metadata, SETTINGS: "{oops"})})
        if SETTINGS in metadata:
            other = json.dumps({**json.loads(metadata[SETTINGS]), "lora_alpha": 3.0})
            self.case("the settings copy of another adapter", {WEIGHTS: save_bytes(tensors, {**metadata,
                                                                                            SETTINGS: other})})


class _Delete:
    def __repr__(self):
        return "<removed>"


DELETE = _Delete()
DORA = LoraConfig(r=4, alpha=8, targets=("wq", "wk", "w3"), use_dora=True)


def test_a_dora_adapter_survives_every_damage(tmp_path, capsys):
    """The full battery: DoRA on attention and MLP layers (A, B and the magnitudes, q/k rows permuted)."""
    rng = random.Random(0)
    f = Faults(tiny_model("tiny-gqa"), DORA, tmp_path / "adapter")
    n, end = len(f.original[WEIGHTS]), 8 + f.header_len
    f.truncations(WEIGHTS, [0, 1, 4, 7, 8, 9, end // 2, end - 1, end, end + 1, n - 1, n - 4]
                  + [end + (n - end) * i // 24 for i in range(24)])
    c = len(f.original[CONFIG])
    f.truncations(CONFIG, [0, 1, c - 1, c - 2, c - 3] + [c * i // 24 for i in range(24)])
    f.header_flips(200, rng)
    f.header_dtype_swaps()
    f.json_fields()
    f.tensor_edits(rng)
    f.check("DoRA r=4 on wq, wk, w3", capsys)
    assert f.counts["clear error"] > 0.8 * f.counts["cases"] and f.counts["loaded identical"] > 0


def test_an_adapter_on_some_layers_and_the_head_survives_damage(tmp_path, capsys):
    """rsLoRA on one layer and the (untied) head: layers_to_transform and lm_head in the names."""
    cfg = LoraConfig(r=2, alpha=4, targets=("wv", "w2", "output"), layers=(1,), use_rslora=True)
    f = Faults(tiny_model("tiny-gqa"), cfg, tmp_path / "adapter")
    f.json_fields()
    f.tensor_edits(random.Random(1))
    f.check("rsLoRA r=2 on layer 1's wv, w2 and the head", capsys)


def test_an_adapter_without_the_settings_copy_still_checks_every_field(tmp_path, capsys):
    """An adapter saved by HF peft has no settings copy: every wrong type and range is still refused, and only a
    different but valid lora_alpha or use_rslora loads (that is what the copy is for)."""
    f = Faults(tiny_model("tiny-gqa"), DORA, tmp_path / "adapter", copy_settings=False)
    f.json_fields()
    f.check("DoRA, no settings copy", capsys)
    assert f.counts["loaded different (documented)"] > 0  # the limit is real, and documented


# ---------------------------------------------------------------------------- the messages name file and field
@pytest.fixture
def saved(tmp_path):
    model = tiny_model("tiny-gqa")
    apply_lora(model, DORA)
    randomize_adapter(model)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def edit_config(folder, **changes):
    config = json.loads((folder / CONFIG).read_text())
    for key, value in changes.items():
        if value is DELETE:
            del config[key]
        else:
            config[key] = value
    (folder / CONFIG).write_text(json.dumps(config))


@pytest.mark.parametrize("changes,message", [
    ({"r": 8.9}, r"adapter_config.json: r is 8.9, not a whole number >= 1"),
    ({"r": True}, r"r is true, not a whole number >= 1"),
    ({"r": DELETE}, r"lacks the required field 'r'"),
    ({"lora_alpha": math.nan}, r"lora_alpha is NaN, not a finite number > 0"),
    ({"lora_alpha": "16"}, r"lora_alpha is \"16\", not a finite number > 0"),
    ({"lora_dropout": 1.0}, r"lora_dropout is 1.0, not a number in \[0, 1\)"),
    ({"use_dora": "false"}, r"use_dora is \"false\", not true or false"),
    ({"layers_to_transform": "01"}, r"layers_to_transform is \"01\", not null, a layer index or a non-empty list"),
    ({"layers_to_transform": [0, -1]}, r"layers_to_transform is \[0, -1\]"),
    ({"target_modules": [3]}, r"target_modules is \[3\], not a module name"),
    ({"target_modules": ["embed_tokens"]}, r"target_modules: unknown LoRA target\(s\) \['embed_tokens'\]"),
    ({"target_modules": "q_proj("}, r"target_modules \"q_proj\(\" is not a regular expression"),
    ({"peft_type": "IA3"}, r"peft_type \"IA3\" is not supported"),
])
def test_each_config_field_is_checked_and_named(saved, changes, message):
    edit_config(saved, **changes)
    with pytest.raises(AdapterError, match=message):
        read_adapter_config(saved)


def test_a_valid_but_different_value_is_named_by_the_copy(saved):
    """lora_alpha 80 instead of 8 passes every range check and would scale every update tenfold."""
    edit_config(saved, lora_alpha=80)
    assert read_adapter_config(saved).alpha == 80  # the config alone is a valid one
    model = tiny_model("tiny-gqa")
    with pytest.raises(AdapterError, match=r"disagree on lora_alpha: adapter_config.json says 80, "
                                           r"adapter_model.safetensors was saved with 8"):
        load_adapter(model, saved)
    edit_config(saved, lora_alpha=8, lora_dropout=0.25, base_model_name_or_path="my/base")  # training-only, labels
    assert load_adapter(model, saved).dropout == 0.25


def rewrite_tensors(folder, edit, metadata=None):
    tensors, saved_metadata = Faults.read_weights((folder / WEIGHTS).read_bytes())
    edit(tensors)
    (folder / WEIGHTS).write_bytes(save_bytes(tensors, saved_metadata if metadata is None else metadata))


def test_layers_are_checked_against_the_model(saved):
    rewrite_tensors(saved, lambda t: None, metadata={"format": "pt"})  # as HF peft saves: no settings copy
    edit_config(saved, layers_to_transform=[5])
    with pytest.raises(AdapterError, match=r"layers_to_transform names layer\(s\) \[5\], but the model has 2 "):
        load_adapter(tiny_model("tiny-gqa"), saved)


A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
M = "base_model.model.model.layers.1.mlp.up_proj.lora_magnitude_vector"


@pytest.mark.parametrize("edit,message", [
    (lambda t: t[A].__setitem__((0, 0), math.nan), rf"tensor {A} holds NaN or Inf values"),
    (lambda t: t[M].__setitem__(3, -math.inf), rf"tensor {M} holds NaN or Inf values"),
    (lambda t: t.update({A: t[A].to(torch.int32)}), rf"tensor {A} is stored as int32, not as floats"),
    (lambda t: t.update({A: t[A][None]}), r"has shape \(1, 4, 64\), but this model's layers.0.attention.wq needs"),
])
def test_each_tensor_is_checked_and_named(saved, edit, message):
    rewrite_tensors(saved, edit)
    model = tiny_model("tiny-gqa")
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, saved)
    assert not any(".lora_" in n for n, _ in model.named_parameters())  # refused before touching the model


def test_a_truncated_or_missing_weights_file_is_named(saved):
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[:len(data) // 2])
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors is truncated or not a safetensors file"):
        load_adapter(tiny_model("tiny-gqa"), saved)
    (saved / WEIGHTS).unlink()
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors not found"):
        load_adapter(tiny_model("tiny-gqa"), saved)


def test_loading_under_a_taken_name_is_refused_before_touching_the_model(saved):
    model = tiny_model("tiny-gqa")
    apply_lora(model, LoraConfig(r=2, targets=("wq",), layers=(1,)))  # "default" on one layer only
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(AdapterError, match="already has an adapter 'default'"):
        load_adapter(model, saved)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    load_adapter(model, saved, name="dora")


def test_lora_config_checks_types_too():
    assert LoraConfig(layers=3).layers == (3,) and LoraConfig(layers=range(1, 3)).layers == (1, 2)
    assert LoraConfig(layers=[1, 1, 0]).layers == (1, 0)  # a repeated layer is adapted once
    for bad in [dict(r=8.9), dict(r=True), dict(alpha=math.nan), dict(alpha=-1), dict(dropout="0.1"),
                dict(dropout=math.nan), dict(layers="01"), dict(layers=[0, -1]), dict(layers=[True]),
                dict(targets=[1]), dict(targets=None), dict(use_dora="yes")]:
        with pytest.raises(AdapterError):
            LoraConfig(**bad)
