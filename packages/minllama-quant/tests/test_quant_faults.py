"""Fault injection for load_quantized: real checkpoints, damaged in many ways (truncated at many offsets, header
bytes flipped, every quant.json field given every wrong type and range, tensors added, removed, duplicated,
reshaped, retyped, filled with NaN/Inf, files missing or replaced). Each damaged checkpoint must either raise the
documented error (QuantizationError, or core's CheckpointError; both name the file) or load a model whose logits
equal the undamaged one's, bit for bit. Never another exception, never a model that computes something else.
The counts are printed (run with -s to see them)."""
import json
import math
import random
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from minllama.core.formats import CheckpointError
from minllama.quant import QuantizationError, load_quantized, quantize, save_quantized
from quant_helpers import tiny_model

TOKENS = torch.tensor([[1, 7, 42, 255, 3, 99, 0, 12]])
QUANT, WEIGHTS = "quant.json", "model.safetensors"
SETTINGS = "minllama.quant"  # the metadata key of model.safetensors that holds the copy of quant.json's settings
WRONG_VALUES = [None, "x", "", math.nan, math.inf, -1, 0, 10 ** 12, 1e300, 2.5, True, False, [], [1], {}, {"x": 1}]
# Without the copy (checkpoints saved before it existed), a valid but different number in these fields cannot be
# told from the original: the model loads and computes something else. The README says so.
UNPROTECTED_WITHOUT_COPY = ("config.norm_eps", "config.rope_theta", "config.rope_scaling")
MODULE_SAMPLE = ("layers.0.attention.wq", "layers.1.feed_forward.w2", "output")


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
    """One saved checkpoint, kept in memory; ``case`` writes a damaged copy into one folder and loads it."""

    def __init__(self, model, folder, copy: bool = True):
        save_quantized(model, folder)
        self.folder = folder
        self.original = {name: (folder / name).read_bytes() for name in (QUANT, WEIGHTS)}
        self.original[WEIGHTS] = sorted_metadata(self.original[WEIGHTS])
        if not copy:  # an older save: no settings copy in the header
            tensors, metadata = self.tensors()
            metadata.pop(SETTINGS)
            self.original[WEIGHTS] = save_bytes(tensors, metadata)
        self.meta = json.loads(self.original[QUANT])
        self.header_len = struct.unpack("<Q", self.original[WEIGHTS][:8])[0]
        self.has_copy = SETTINGS in self.tensors()[1]
        self.reference = self.load_and_run({})
        with torch.no_grad():
            assert torch.equal(self.reference, model(TOKENS))  # the undamaged checkpoint round-trips exactly
        self.counts = {"cases": 0, "clear error": 0, "loaded identical": 0, "loaded different (documented)": 0}
        self.problems = []

    def tensors(self):
        """The undamaged tensors and header metadata."""
        data = self.original[WEIGHTS]
        header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
        return load_bytes(data), dict(header.get("__metadata__", {}))

    def write(self, files: dict):
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir()
        for name, content in {**self.original, **files}.items():
            if content == "dir":
                (self.folder / name).mkdir()
            elif content is not None:
                (self.folder / name).write_bytes(content)

    def load_and_run(self, files: dict):
        self.write(files)
        model = load_quantized(self.folder)
        with torch.no_grad():
            return model(TOKENS)

    def case(self, label: str, files: dict, may_differ: bool = False) -> str:
        self.counts["cases"] += 1
        try:
            out = self.load_and_run(files)
        except (QuantizationError, CheckpointError) as e:
            if not any(name in str(e) for name in (QUANT, WEIGHTS, str(self.folder))):
                self.problems.append(f"{label}: the error names no file: {e}")
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
        positions = list(range(8)) + rng.sample(range(8, end), min(n_positions, end - 8))
        for pos in positions:
            bit = 1 << rng.randrange(8)
            flipped = bytearray(data)
            flipped[pos] ^= bit
            self.case(f"{WEIGHTS} byte {pos} ^ {bit:#x}", {WEIGHTS: bytes(flipped)})
        for pos in rng.sample(range(8, end), min(n_positions // 4, end - 8)):  # a whole byte replaced
            flipped = bytearray(data)
            flipped[pos] = rng.choice([0, 0x22, 0x7B, 0x7D, 0x2C, 0x5B, 0xFF, ord("9"), ord("-")])
            self.case(f"{WEIGHTS} byte {pos} = {flipped[pos]:#x}", {WEIGHTS: bytes(flipped)})

    def header_dtype_swaps(self):
        """Same-size dtypes swapped in the header: the file stays consistent, so only the loader's dtype check sees
        it (I8 and U8 are both one byte, F16/BF16/I16 two, F32/I32 four)."""
        data = self.original[WEIGHTS]
        header = json.loads(data[8:8 + self.header_len])
        swaps = {"I8": ["U8"], "U8": ["I8"], "F16": ["BF16", "I16"], "BF16": ["F16"], "F32": ["I32", "U32"],
                 "F8_E4M3": ["F8_E5M2", "U8"]}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            for new in swaps.get(entry["dtype"], []):
                edited = {**header, name: {**entry, "dtype": new}}
                text = json.dumps(edited).encode()
                text += b" " * (-len(text) % 8)
                body = struct.pack("<Q", len(text)) + text + data[8 + self.header_len:]
                self.case(f"{name} {entry['dtype']} -> {new} in the header", {WEIGHTS: body})

    def json_fields(self, only=None):
        """Every field of quant.json: removed, and replaced by every wrong value."""
        def walk(value, path):
            if path:
                yield path
            if isinstance(value, dict):
                for k, v in value.items():
                    yield from walk(v, path + (k,))
            elif isinstance(value, list):
                for i, v in enumerate(value):
                    yield from walk(v, path + (i,))

        for path in walk(self.meta, ()):
            dotted = ".".join(map(str, path))
            if only and not dotted.startswith(only):
                continue
            if path[0] == "modules" and len(path) > 1 and path[1] not in MODULE_SAMPLE:
                continue  # every module's fields are alike: three of them (attention, MLP, head) stand for all
            original = self.get(path)
            for value in [DELETE] + WRONG_VALUES:
                if value is not DELETE and json.dumps(value) == json.dumps(original):
                    continue
                edited = self.edited(path, value)
                if edited is None:
                    continue
                self.case(f"quant.json {dotted} = {value!r}", {QUANT: json.dumps(edited).encode()},
                          may_differ=dotted.startswith(UNPROTECTED_WITHOUT_COPY) and not self.has_copy)

    def get(self, path):
        value = self.meta
        for k in path:
            value = value[k]
        return value

    def edited(self, path, value):
        meta = json.loads(json.dumps(self.meta))
        parent = meta
        for k in path[:-1]:
            parent = parent[k]
        if value is DELETE:
            if isinstance(parent, list):
                return None
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        return meta

    def json_files(self):
        text = self.original[QUANT].decode()
        for label, content in [
            ("empty", b""), ("not UTF-8", b"\xff\xfe" + text.encode()), ("a list", b"[1, 2]"), ("a string", b'"q"'),
            ("null", b"null"), ("a number", b"1"), ("deeply nested", b"[" * 100000 + b"]" * 100000),
            ("NaN literal", text.replace('"format_version": 1', '"format_version": NaN').encode()),
            ("a key twice", text.replace('"format_version": 1', '"format_version": 1, "format_version": 1').encode()),
            ("a module twice", text.replace('"modules": {', '"modules": {"output": {"class": "Int8Linear"}, ')
             .encode()),
            ("an extra field", text.replace('"format_version": 1', '"format_version": 1, "notes": "mine"').encode()),
            ("a directory", "dir"), ("missing", None),
        ]:
            self.case(f"quant.json {label}", {QUANT: content})
        for label, content in [("empty", b""), ("a directory", "dir"), ("missing", None),
                               ("quant.json's bytes", self.original[QUANT]), ("8 zero bytes", b"\0" * 8),
                               ("a huge header length", struct.pack("<Q", 2 ** 62) + b"{}")]:
            self.case(f"model.safetensors {label}", {WEIGHTS: content})

    def tensor_edits(self, rng: random.Random):
        tensors, metadata = self.tensors()
        names = sorted(tensors)  # safetensors returns them in no fixed order

        def case(label, edited):
            self.case(label, {WEIGHTS: save_bytes(edited, metadata)})

        picks = sorted({names[0], names[-1], *rng.sample(names, min(8, len(names)))} |
                       {n for n in names if n.endswith(("norm.weight", "scales", "mins", "absmax_scale", "blocks"))
                        and n.startswith(("layers.0.", "output", "norm", "tok_"))})
        for name in picks:
            t = tensors[name]
            case(f"{name} removed", {k: v for k, v in tensors.items() if k != name})
            case(f"{name} stored twice", {**tensors, name.replace("layers.0.", "layers.1.", 1) + ".copy": t.clone()})
            for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
                          torch.int32):
                if dtype != t.dtype:
                    case(f"{name} as {dtype}", {**tensors, name: t.to(dtype)})
            for label, changed in [("transposed", t.T.contiguous() if t.ndim == 2 else None),
                                   ("flattened", t.reshape(-1) if t.ndim > 1 else None),
                                   ("one row less", t[:-1].contiguous() if t.shape[0] > 1 else None),
                                   ("one row more", torch.cat([t, t[:1]])), ("a dimension more", t[None])]:
                if changed is not None and changed.shape != t.shape:
                    case(f"{name} {label} {tuple(changed.shape)}", {**tensors, name: changed})
            if t.is_floating_point():
                for bad in (math.nan, math.inf, -math.inf):
                    poisoned = t.clone()
                    poisoned.view(-1)[rng.randrange(t.numel())] = bad
                    if bool(torch.isfinite(poisoned.float()).all()):
                        continue  # e4m3 has no Inf: it stored the largest code, a valid value like any other
                    case(f"{name} with a {bad}", {**tensors, name: poisoned})
            if name.endswith("blocks"):  # GGUF bytes: a NaN in the fp16 scale d of one block (0x7e00)
                poisoned = t.clone()
                poisoned[0, 0], poisoned[0, 1] = 0x00, 0x7E
                case(f"{name} with a NaN block scale", {**tensors, name: poisoned})
        case("an extra tensor", {**tensors, "extra.weight": torch.zeros(3)})
        case("a tensor of a layer that does not exist", {**tensors, "layers.7.attention_norm.weight": torch.ones(64)})
        case("no tensors", {"norm.weight": tensors["norm.weight"]})
        self.case("the settings copy removed (an older save)", {WEIGHTS: save_bytes(tensors, {"format": "pt"})})
        self.case("the settings copy not JSON", {WEIGHTS: save_bytes(tensors, {**metadata, SETTINGS: "{oops"})})
        fp8 = [n for n in names if tensors[n].dtype == torch.float8_e4m3fn]
        if fp8:  # e4m3 has a NaN (0x7f) and no Inf
            poisoned = tensors[fp8[0]].clone()
            poisoned.view(torch.uint8).view(-1)[0] = 0x7F
            case(f"{fp8[0]} with a NaN code", {**tensors, fp8[0]: poisoned})


class _Delete:
    def __repr__(self):
        return "<removed>"


DELETE = _Delete()


def test_int4_with_int8_head_checkpoint_survives_every_damage(tmp_path, capsys):
    """The full battery on a tied int4 model with an int8 head (two module classes, fp16 and fp32 scales)."""
    rng = random.Random(0)
    f = Faults(quantize(tiny_model("tiny-mqa"), "int4", group_size=32, head="int8"), tmp_path / "q")
    n = len(f.original[WEIGHTS])
    end = 8 + f.header_len
    f.truncations(WEIGHTS, [0, 1, 4, 7, 8, 9, end // 2, end - 1, end, end + 1, n - 1, n - 2, n - 8]
                  + [end + (n - end) * i // 24 for i in range(24)])
    q = len(f.original[QUANT])
    f.truncations(QUANT, [0, 1, q - 1, q - 2, q - 3] + [q * i // 24 for i in range(24)])
    f.header_flips(160, rng)
    f.header_dtype_swaps()
    f.json_fields()
    f.json_files()
    f.tensor_edits(rng)
    f.check("int4 g32 + int8 head (tied)", capsys)
    assert f.counts["clear error"] > 0.8 * f.counts["cases"] and f.counts["loaded identical"] > 0


@pytest.mark.parametrize("name,scheme,opts", [("tiny-gqa", "nf4", {"double_quant": True}), ("tiny-gqa", "fp8", {}),
                                              ("tiny-gqa", "q4_1", {})])
def test_other_module_classes_survive_tensor_damage(name, scheme, opts, tmp_path, capsys):
    """Untied models (a float embedding), NF4's quantized absmax, fp8 codes (which can hold a NaN), GGUF bytes."""
    f = Faults(quantize(tiny_model(name), scheme, **opts), tmp_path / "q")
    f.tensor_edits(random.Random(1))
    f.header_dtype_swaps()
    f.json_fields(only="quantization")
    f.check(f"{scheme} {opts or ''}".strip(), capsys)


def test_an_older_save_without_the_settings_copy_still_checks_every_field(tmp_path, capsys):
    """Without the copy, the per-field checks alone stand between a damaged quant.json and the model: every
    wrong type and range is refused; only a different but valid norm_eps/rope_theta/rope_scaling loads (that
    is what the copy is for)."""
    f = Faults(quantize(tiny_model("tiny-mqa"), "int4", group_size=32, head="int8"), tmp_path / "q", copy=False)
    f.json_fields()
    f.check("int4 + int8 head, no settings copy", capsys)
    assert f.counts["loaded different (documented)"] > 0  # the limit is real, and documented


def test_a_gguf_checkpoint_checks_its_block_types(tmp_path, capsys):
    """A model from load_gguf_quantized saves as scheme 'gguf' with the file's block types (a tiny stand-in)."""
    model = quantize(tiny_model("tiny-gqa"), "q4_1")
    model.quant_config = {"scheme": "gguf", "qtypes": ["q4_1"]}
    f = Faults(model, tmp_path / "q")
    assert load_quantized(tmp_path / "q", scheme="gguf").quant_config == model.quant_config
    f.json_fields(only="quantization")
    f.json_fields(only="modules.layers.0")
    f.check("gguf q4_1", capsys)


# ---------------------------------------------------------------------------- the messages name file and field
@pytest.fixture
def saved(tmp_path):
    save_quantized(quantize(tiny_model("tiny-mqa"), "int4", group_size=32, head="int8"), tmp_path / "q")
    return tmp_path / "q"


def edit_json(folder, edit):
    meta = json.loads((folder / QUANT).read_text())
    edit(meta)
    (folder / QUANT).write_text(json.dumps(meta))


def drop_copy(folder):
    tensors = load_bytes((folder / WEIGHTS).read_bytes())
    (folder / WEIGHTS).write_bytes(save_bytes(tensors, {"format": "pt"}))


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["config"].update(norm_eps=0.5), r"disagree on config\.norm_eps: quant.json says 0\.5, "
                                                 r"model.safetensors was saved with 1e-05"),
    (lambda m: m["modules"]["layers.0.attention.wq"].update(group_size=64), r"disagree on modules\.layers\.0\."
                                                                             r"attention\.wq\.group_size"),
])
def test_an_edited_quant_json_is_named_by_the_copy(saved, edit, message):
    edit_json(saved, edit)
    with pytest.raises(QuantizationError, match=message):
        load_quantized(saved)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(format_version="1"), r"quant.json: format_version is \"1\", not 1"),
    (lambda m: m["quantization"].update(scheme="int3"), r"quantization.scheme is \"int3\", not one of int8, int4"),
    (lambda m: m["quantization"].update(group_size=48), r"quantization.group_size is 48, not one of 32, 64"),
    (lambda m: m["quantization"].update(group_size=32.0), r"quantization.group_size is 32.0, not one of"),
    (lambda m: m["quantization"].update(head="int2"), r"quantization.head is \"int2\""),
    (lambda m: m["config"].update(dim="64"), r"quant.json: config: dim='64' must be a whole number"),
    (lambda m: m["config"].update(n_layers=10 ** 9), r"config.n_layers is 1000000000, but model.safetensors holds "
                                                      r"2 layers"),
    (lambda m: m["config"].update(rope_scaling=[8.0]), r"config.rope_scaling is \[8.0\], not an object or null"),
    (lambda m: m["config"].update(colour="red"), r"config: .*unexpected keyword argument 'colour'"),
    (lambda m: m.update(tied_embedding=False), r"tied_embedding is false but config.tie_embeddings is true"),
    (lambda m: m["modules"]["layers.0.attention.wq"].update({"class": "Int5Linear"}),
     r"modules.layers.0.attention.wq is .*Int5Linear.*not an object whose class is one of Int8Linear"),
    (lambda m: m["modules"]["layers.0.attention.wq"].update(group_size=64),
     r"modules.layers.0.attention.wq is .*64.*but quantization .* makes it .*32"),
    (lambda m: m["modules"].update({"layers.5.attention.wq": {"class": "Int4Linear", "group_size": 32}}),
     r"modules names layers.5.attention.wq, which a model of this config \(2 layers\) does not have"),
    (lambda m: m["modules"].pop("output"), r"modules lacks output"),
])
def test_each_field_is_checked_and_named(saved, edit, message):
    drop_copy(saved)  # an older save: the field checks alone
    edit_json(saved, edit)
    with pytest.raises(QuantizationError, match=message):
        load_quantized(saved)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("layers.1.feed_forward.w2.mins"), r"missing \['layers.1.feed_forward.w2.mins'\]"),
    (lambda t: t.update({"layers.0.attention.wq.scales": t["layers.0.attention.wq.scales"].double()}),
     r"tensor layers.0.attention.wq.scales is stored as float64, but Int4Linear keeps it as float16"),
    (lambda t: t.update({"layers.0.attention.wq.qweight": t["layers.0.attention.wq.qweight"].view(torch.int8)}),
     r"tensor layers.0.attention.wq.qweight is stored as int8, but Int4Linear keeps it as uint8"),
    (lambda t: t.update({"output.qweight": t["output.qweight"][:-1]}),
     r"tensor output.qweight has shape \(255, 64\), but quant.json's config and modules need \(256, 64\)"),
    (lambda t: t["output.scales"].__setitem__(3, math.inf), r"tensor output.scales holds NaN or Inf values"),
    (lambda t: t["norm.weight"].__setitem__(0, math.nan), r"tensor norm.weight holds NaN or Inf values"),
])
def test_each_tensor_is_checked_and_named(saved, edit, message):
    with safe_open(str(saved / WEIGHTS), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_bytes((saved / WEIGHTS).read_bytes())
    edit(tensors)
    (saved / WEIGHTS).write_bytes(save_bytes(tensors, metadata))
    with pytest.raises(QuantizationError, match=message):
        load_quantized(saved)


def test_a_truncated_weights_file_is_named(saved):
    data = (saved / WEIGHTS).read_bytes()
    (saved / WEIGHTS).write_bytes(data[:len(data) // 2])
    with pytest.raises(QuantizationError, match=r"model.safetensors is truncated or not a safetensors file"):
        load_quantized(saved)
    (saved / WEIGHTS).unlink()
    with pytest.raises(QuantizationError, match=r"model.safetensors is missing"):
        load_quantized(saved)


def test_a_bf16_model_round_trips_in_bf16(tmp_path):
    """model.to(bf16) turns the float buffers (norms, scales) to bf16: they load as saved, and compute in bf16."""
    model = quantize(tiny_model("tiny-mqa"), "int4", group_size=32).to(torch.bfloat16)
    save_quantized(model, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q")
    sa, sb = model.state_dict(), loaded.state_dict()
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    assert loaded(TOKENS).dtype == torch.bfloat16


def test_loaded_tensors_are_aligned_for_the_kernels(tmp_path):
    """safetensors hands out each tensor where the file has it; an int8 tensor after an odd number of bytes of
    other int8 tensors is not 16-byte aligned, and _weight_int8pack_mm then crashes the process (SIGSEGV, found by
    the fault suite above with fp32 scales that shifted the head). The loader copies such tensors."""
    model = quantize(tiny_model("tiny-mqa"), "int4", group_size=32, head="int8")
    save_quantized(model, tmp_path / "q")
    tensors = load_bytes((tmp_path / "q" / WEIGHTS).read_bytes())
    with safe_open(str(tmp_path / "q" / WEIGHTS), framework="pt") as f:
        metadata = f.metadata()
    tensors["layers.0.attention.wq.scales"] = tensors["layers.0.attention.wq.scales"].float()  # shifts the rest
    (tmp_path / "q" / WEIGHTS).write_bytes(save_bytes(tensors, metadata))
    loaded = load_quantized(tmp_path / "q")
    misaligned = [k for k, t in loaded.state_dict().items() if t.data_ptr() % 64]
    assert misaligned == []
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS[:, :4]), model(TOKENS[:, :4]))  # 4 rows: the packed kernels


def test_load_gguf_quantized_checks_the_vocabulary_as_load_pretrained_does(tmp_path):
    """A token of the embedded file that is not UTF-8 (its strings are decoded by the tokenizer, after the weights):
    one CheckpointError naming the tokenizer, as load_pretrained gives; the weights alone still load."""
    from minllama.core.checkpoint import default_model_path
    from minllama.core.gguf_file import GGUFFile
    from minllama.quant import load_gguf_quantized

    with open(default_model_path(), "rb") as f:
        data = bytearray(f.read())
    tokens = GGUFFile(default_model_path()).fields["tokenizer.ggml.tokens"]
    data[tokens._starts[1000] + 8] = 0xFF  # the first byte of token 1000: never valid UTF-8
    path = tmp_path / "bad-vocab.gguf"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="the tokenizer cannot be read .*string 1000 of the array"):
        load_gguf_quantized(path)
    model, tokenizer = load_gguf_quantized(path, with_tokenizer=False)
    assert tokenizer is None and model.config.vocab_size == 49152
