"""Generation arguments: every bad value is one ValueError naming the argument, before any work is done; the edge
values that mean "off" (top_p=1, top_k=0, temperature=0) are accepted; NaN logits raise instead of yielding a token."""
import numpy as np
import pytest
import torch

from core_helpers import tiny_model
from minllama.core.generate import generate, generate_stream, sample, stream_text

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def model():
    return tiny_model("tiny-gqa")  # vocab_size 256


BAD = [  # (keyword arguments of generate, the name the message must start with)
    *[({"max_new_tokens": v}, "max_new_tokens") for v in (-1, 2.0, 2.5, True, "3", None, NAN)],
    *[({"temperature": v}, "temperature") for v in (NAN, INF, -INF, -0.5, True, "1", None)],
    *[({"top_p": v}, "top_p") for v in (0.0, -0.1, 1.01, NAN, INF, True, "0.9")],
    *[({"top_k": v}, "top_k") for v in (-1, 2.5, True, "5")],
    *[({"pad_id": v}, "pad_id") for v in (-1, 256, 1.0)],
    *[({"prompts": v}, "prompts") for v in ([], [[]], [[1], []], [1, 2, 3], "abc", ["abc"])],
    *[({"prompts": v}, r"prompts\[") for v in ([[1, -1]], [[256]], [[1], [2, 10**9]], [[1.0]], [[True]],
                                               [[1, None]], [["a"]])],
]


@pytest.mark.parametrize("kwargs, name", BAD, ids=[f"{k}={v!r}" for (a, _) in BAD for k, v in a.items()])
def test_bad_argument_is_one_value_error_naming_it(model, kwargs, name):
    args = {"prompts": [[1, 2, 3]], "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=f"^{name}"):
        generate(model, **args)
    with pytest.raises(ValueError, match=f"^{name}"):
        next(generate_stream(model, **args))


def test_bad_argument_fails_before_the_model_runs(model, monkeypatch):
    calls = []
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1, 2]], 4, temperature=NAN)
    assert calls == []


@pytest.mark.parametrize("kwargs", [
    {"temperature": 0}, {"temperature": 0.0}, {"temperature": 1}, {"temperature": 1e-3}, {"temperature": 1e6},
    {"temperature": 1.0, "top_p": 1.0}, {"temperature": 1.0, "top_p": 1}, {"temperature": 1.0, "top_p": 1e-9},
    {"temperature": 1.0, "top_k": 0}, {"temperature": 1.0, "top_k": 1000}, {"temperature": 1.0, "top_k": None,
                                                                             "top_p": None},
    {"temperature": np.float32(0.7), "top_p": np.float64(0.9), "top_k": np.int64(5)},
    {"max_new_tokens": 0}, {"max_new_tokens": np.int32(3)}, {"pad_id": 255},
    {"prompts": [[0, 255]]}, {"prompts": [np.array([1, 2, 3])]}, {"prompts": [torch.tensor([1, 2, 3])]},
    {"prompts": torch.tensor([[1, 2], [3, 4]])}, {"prompts": ((1, 2), (3,))},
])
def test_edge_values_are_accepted(model, kwargs):
    args = {"prompts": [[1, 2, 3]], "max_new_tokens": 3, "generator": torch.Generator().manual_seed(0), **kwargs}
    out = generate(model, **args)
    assert len(out) == len(args["prompts"]) and all(len(row) == int(args["max_new_tokens"]) for row in out)


def test_top_p_one_and_top_k_zero_sample_like_no_truncation(model):
    run = lambda **kw: generate(model, [[1, 2, 3]], 8, temperature=1.0,  # noqa: E731
                                generator=torch.Generator().manual_seed(3), **kw)
    assert run(top_p=1.0) == run(top_k=0) == run()


class NaNHead(torch.nn.Module):
    """Wraps the output head: logits become NaN from the `after`-th call of the head on (0: the prefill)."""

    def __init__(self, head, after):
        super().__init__()
        self.head, self.after, self.calls = head, after, 0

    def forward(self, x):
        self.calls += 1
        out = self.head(x)
        return out if self.calls <= self.after else torch.full_like(out, NAN)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("after", [0, 3])
def test_nan_logits_raise_instead_of_yielding_a_token(temperature, after):
    model = tiny_model("tiny-gqa")
    model.output = NaNHead(model.output, after)
    tokens = []
    with pytest.raises(ValueError, match="NaN logits"):
        for token in generate_stream(model, [[1, 2, 3]], 10, temperature=temperature,
                                     generator=torch.Generator().manual_seed(0)):
            tokens.append(int(token))
    assert len(tokens) == after  # every token before the broken step came out, none after


def test_nan_logits_in_sample_and_stream_text():
    logits = torch.tensor([[1.0, NAN, 2.0]])
    with pytest.raises(ValueError, match="NaN logits"):
        sample(logits, temperature=1.0)
    model = tiny_model("tiny-gqa")
    model.output = NaNHead(model.output, 0)

    class Tok:
        stop_ids = ()

        def decode_bytes(self, ids, at_start=True):
            return bytes(ids)

    with pytest.raises(ValueError, match="NaN logits"):
        list(stream_text(model, Tok(), [1, 2], 4))

