"""apps/numeric_llama.py: the [NUM] encoding round trip, the value-scaled embedding, the KV cache and the
value-feeding decoder against uncached recomputation, the xVal loss, a short training that must learn, a smoke run."""
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

APPS = Path(__file__).parents[1]
sys.path.insert(0, str(APPS))

import numeric_llama as nl  # noqa: E402
from minllama.core.cache import StaticKVCache  # noqa: E402
from minllama.core.config import LlamaConfig  # noqa: E402
from minllama.core.generate import generate  # noqa: E402
from minllama.core.model import MinimalLlama  # noqa: E402

TOK = nl.NumberTokenizer(scale=100.0)


def tiny_numeric(seed=0) -> nl.NumericLlama:
    torch.manual_seed(seed)
    cfg = LlamaConfig.from_name("tiny-gqa", vocab_size=TOK.vocab_size)
    model = nl.NumericLlama(cfg, TOK.num_id)
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize("text", ["12.5 + 3 = 15.5", "double of 0.07 is 0.14", "3.1, 5.6, 8.1, next 10.6",
                                  "half of 199.9 is 99.95", "no numbers here", "42"])
def test_number_encoding_round_trip(text):
    ids, values = TOK.encode_numbers(text)
    numbers = [float(m) for m in nl.NumberTokenizer.NUMBER.findall(text)]
    assert ids.count(TOK.num_id) == len(numbers)
    assert [v * TOK.scale for i, v in zip(ids, values) if i == TOK.num_id] == pytest.approx(numbers)
    assert all(v == 1.0 for i, v in zip(ids, values) if i != TOK.num_id)
    assert TOK.decode_numbers(ids, values) == text
    assert TOK.decode_digits(TOK.encode_digits(text)) == text
    assert len(ids) == len(text) - sum(len(m) for m in nl.NumberTokenizer.NUMBER.findall(text)) + len(numbers)


def test_unknown_characters_are_refused_by_name():
    with pytest.raises(ValueError, match="'Q' is not in the vocabulary"):
        TOK.encode_numbers("Q = 3")


def test_num_embedding_is_the_value_times_the_num_vector_plus_the_anchor():
    model = tiny_numeric()
    ids, values = TOK.encode_numbers("7.5 + 2 = ")
    tokens, vals = torch.tensor([ids]), torch.tensor([values])
    h = model.embed(tokens, vals)[0]
    E, anchor = model.tok_embeddings.weight, model.num_anchor
    assert torch.allclose(h[0], 0.075 * E[TOK.num_id] + anchor)
    assert torch.allclose(h[4], 0.02 * E[TOK.num_id] + anchor)
    assert torch.equal(h[1], E[TOK.ids[" "]])
    # the value reaches the output through the RMSNorms: another number, another prediction
    other = vals.clone()
    other[0, 0] = 0.5
    with torch.no_grad():
        assert not torch.allclose(model.forward_numbers(tokens, vals)[1], model.forward_numbers(tokens, other)[1])


def test_without_numbers_it_is_exactly_the_parent_model():
    model = tiny_numeric()
    plain = MinimalLlama(model.config)
    missing = plain.load_state_dict(model.state_dict(), strict=False)
    assert set(missing.unexpected_keys) == {"num_anchor", "number_head.0.weight", "number_head.0.bias",
                                            "number_head.2.weight", "number_head.2.bias"}
    tokens = torch.tensor([TOK.encode_digits("double of 3 is 6")])
    with torch.no_grad():
        assert torch.allclose(model(tokens), plain(tokens), atol=1e-6)
    prompts = [TOK.encode_digits("1 + 2 = "), TOK.encode_digits("half of 8 is ")]  # left padding, cache, mask
    assert generate(model, prompts, max_new_tokens=5) == generate(plain.eval(), prompts, max_new_tokens=5)


def test_num_tokens_without_values_are_an_error_that_names_the_fix():
    model = tiny_numeric()
    with pytest.raises(ValueError, match="forward_numbers"):
        model(torch.tensor([[TOK.bos_id, TOK.num_id]]))


def test_kv_cache_equals_the_full_forward_for_logits_and_numbers():
    model = tiny_numeric()
    tokens, values = nl.batch_numbers(TOK, ["3.1, 5.6, 8.1, next 10.6", "12.5 + 30.25 = 42.75"])
    T = tokens.size(1)
    with torch.no_grad():
        full_logits, full_numbers = model.forward_numbers(tokens, values)
        cache = StaticKVCache(model, 2, 32)
        pre_logits, pre_numbers = model.forward_numbers(tokens[:, :5], values[:, :5], torch.arange(5), cache=cache)
        steps = [model.forward_numbers(tokens[:, t:t + 1], values[:, t:t + 1], torch.tensor([t]), cache=cache)
                 for t in range(5, T)]
    assert torch.allclose(pre_logits, full_logits[:, :5], atol=1e-5)
    assert torch.allclose(pre_numbers, full_numbers[:, :5], atol=1e-5)
    assert torch.allclose(torch.cat([s[0] for s in steps], 1), full_logits[:, 5:], atol=1e-5)
    assert torch.allclose(torch.cat([s[1] for s in steps], 1), full_numbers[:, 5:], atol=1e-5)


def test_generate_numbers_feeds_predicted_values_back_like_an_uncached_loop():
    model = tiny_numeric(seed=3)
    with torch.no_grad():  # make [NUM] the likely next token so that values are really fed back
        model.output.weight[TOK.num_id] += 0.5 * model.norm.weight
    prompts = [([TOK.bos_id] + ids, [1.0] + vals)
               for ids, vals in (TOK.encode_numbers("5 + 7 = "), TOK.encode_numbers("9 + 1 = "))]
    got = nl.generate_numbers(model, prompts, max_new_tokens=6, stop_id=TOK.eos_id)
    for (ids, vals), (new_ids, new_vals) in zip(prompts, got):
        ids, vals = list(ids), list(vals)
        with torch.no_grad():
            for _ in range(len(new_ids)):  # oracle: recompute everything from scratch at every step
                logits, numbers = model.forward_numbers(torch.tensor([ids]), torch.tensor([vals]))
                token = int(logits[0, -1].argmax())
                ids.append(token)
                vals.append(float(numbers[0, -1]) if token == TOK.num_id else 1.0)
        assert new_ids == ids[len(prompts[0][0]):]
        assert new_vals == pytest.approx(vals[len(prompts[0][0]):], abs=1e-5)
    assert any(TOK.num_id in new_ids for new_ids, _ in got)
    assert [name for name, _ in model.named_buffers()] == ["rope"]  # the cache was the call's, not the model's


def test_xval_loss_is_cross_entropy_plus_the_squared_error_at_num_targets():
    model = tiny_numeric()
    tokens, values = nl.batch_numbers(TOK, ["2 + 3 = 5", "double of 1.5 is 3"])
    loss, ce, mse = nl.numeric_loss(model, tokens, values, TOK.pad_id, mse_weight=2.0)
    logits, numbers = model.forward_numbers(tokens[:, :-1], values[:, :-1])
    manual_ce = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=TOK.pad_id)
    rows, cols = (tokens[:, 1:] == TOK.num_id).nonzero(as_tuple=True)
    assert len(rows) == 5
    manual_mse = ((numbers[rows, cols] - values[rows, cols + 1]) ** 2).mean()
    assert torch.allclose(ce, manual_ce) and torch.allclose(mse, manual_mse)
    assert torch.allclose(loss, manual_ce + 2.0 * manual_mse)


def test_questions_and_training_lines_are_held_out_and_correct():
    questions = nl.question_set(20, 0, 100, seed=1)
    assert {t for t, _, _ in questions} == set(nl.TASKS)
    for task, q, a in questions:
        nums = [float(x) for x in nl.NumberTokenizer.NUMBER.findall(q)]
        expected = {"add": lambda: nums[0] + nums[1], "double": lambda: 2 * nums[0], "half": lambda: nums[0] / 2,
                    "next": lambda: nums[2] + (nums[2] - nums[1])}[task]()
        assert a == pytest.approx(expected, abs=0.06)  # operands are printed rounded to 0.1
    held = {q for _, q, _ in questions}
    lines = nl.training_lines(500, random.Random(0), 0, 100, held)
    assert not any(line.startswith(q) and nl.parse_number(line[len(q):]) is not None for line in lines for q in held)


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread, above all on a busy machine (threads wait for each other)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_a_short_training_learns_to_double(one_thread):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=TOK.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                      max_seq_len=32)
    model = nl.NumericLlama(cfg, TOK.num_id)
    model.init_weights()
    rng = random.Random(0)
    questions = [f"double of {TOK.format_number(x / 10)} is " for x in range(5, 1000, 37)]
    truth = [2 * nl.parse_number(q.split()[2]) for q in questions]

    def error(answers):
        return sum(abs(a - t) for a, t in zip(answers, truth)) / len(truth)

    with torch.no_grad():  # untrained, the model need not even emit [NUM]: read its number head directly
        tokens, values = nl.batch_numbers(TOK, questions)
        before = error((model.forward_numbers(tokens[:, :-1], values[:, :-1])[1][:, -1] * TOK.scale).tolist())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        lines = [f"double of {TOK.format_number(x)} is {TOK.format_number(2 * x)}"
                 for x in (round(rng.uniform(0, 100), 1) for _ in range(32))]
        loss, _, _ = nl.numeric_loss(model, *nl.batch_numbers(TOK, lines), TOK.pad_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
    answers = nl.answer_numbers(model, TOK, questions)  # generated: [NUM] first, with the head's value
    assert None not in answers
    after = error(answers)
    print(f"mean |error| before {before:.1f}, after {after:.1f}")
    assert after < before / 4 and after < 15, (before, after)


def test_smoke_run_writes_the_plot_and_a_consistent_report(tmp_path):
    results = nl.main(["--steps", "3", "--batch-size", "4", "--dim", "16", "--layers", "1", "--eval-per-task", "2",
                       "--out", str(tmp_path)])
    assert (tmp_path / "numeric_comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "results.json").stat().st_size > 0
    for name in ("digits", "xval"):
        for split in ("in_range", "out_of_range"):
            e = results["evaluation"][name][split]
            assert e["n"] == 8 and len(e["predicted"]) == 8
            assert 0 <= e["no_number"] <= 8
            assert {t: s["n"] for t, s in e["per_task"].items()} == dict.fromkeys(nl.TASKS, 2)
    assert results["params"]["xval"] - results["params"]["digits"] == 16 + (16 * 16 + 16) + (16 + 1)
    truth = results["evaluation"]["xval"]["out_of_range"]["truth"]
    assert results["evaluation"]["digits"]["in_range"]["truth"] == results["evaluation"]["xval"]["in_range"]["truth"]
    assert min(truth) >= 50  # out of range: operands in [train-max, 2 train-max)


def test_summary_counts_missing_answers_and_errors():
    s = nl.summarize([10.0, 20.0, 40.0], [10.05, None, 30.0])
    assert s["no_number"] == 1
    assert s["mean_abs_error"] == pytest.approx((0.05 + 10) / 2)
    assert s["within_1_percent"] == pytest.approx(1 / 3)
    assert math.isnan(nl.summarize([1.0], [None])["median_abs_error"])


def test_help_lists_the_options():
    out = subprocess.run([sys.executable, APPS / "numeric_llama.py", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for option in ("--out", "--steps", "--batch-size", "--dim", "--layers", "--lr", "--mse-weight", "--train-max"):
        assert option in out.stdout
