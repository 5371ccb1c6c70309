"""Speculative decoding changes the speed, never the output: greedy equals the target's own greedy decoding, and the
acceptance rule draws each token exactly from the target's distribution (a statistical test)."""
import pytest
import torch

from core_helpers import tiny_model
from minllama.core.generate import generate
from minllama.core.speculative import LookupDraft, ModelDraft, accept, speculative_generate


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_with_a_model_draft_is_the_targets_greedy(k):
    target, draft = tiny_model("tiny-gqa", seed=0), tiny_model("tiny-gqa", seed=1, n_layers=1)
    prompt = [5, 17, 99, 3, 250, 8]
    stats = {}
    ours = list(speculative_generate(target, prompt, 30, ModelDraft(draft), k=k, stats=stats))
    assert ours == generate(target, [prompt], 30)[0]
    assert stats["forwards"] <= 30  # a random draft is rarely right: never worse than plain decoding in steps


def test_a_perfect_draft_is_always_accepted_and_saves_forwards():
    target = tiny_model("tiny-llama3")
    stats = {}
    ours = list(speculative_generate(target, [1, 2, 3], 40, ModelDraft(target), k=4, stats=stats))
    assert ours == generate(target, [[1, 2, 3]], 40)[0]
    assert stats["accepted"] == stats["drafted"] and stats["forwards"] == 8  # 5 tokens per forward


def test_prompt_lookup_copies_from_the_prompt():
    """A model that repeats what it saw (its greedy continuation loops): lookup drafts are right most of the time."""
    target = tiny_model("tiny-gqa")
    prompt = [7, 8, 9, 10] * 6
    stats = {}
    ours = list(speculative_generate(target, prompt, 40, LookupDraft(), k=5, stats=stats, stop_ids=[3]))
    assert ours == generate(target, [prompt], 40, stop_ids=[3])[0][:len(ours)]
    assert LookupDraft().propose([1, 2, 3, 9, 1, 2], 3)[0] == [3, 9, 1]  # after the last "1 2": what followed
    assert LookupDraft().propose([1, 2, 3], 3)[0] == []


def test_the_acceptance_rule_samples_exactly_the_targets_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0]])  # the target's distribution at one position (vocab of 5)
    q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3]])  # a poor draft's
    n, counts, det = 20_000, torch.zeros(5), torch.zeros(5)
    for _ in range(n):
        d = int(torch.multinomial(q[0], 1, generator=g))
        kept, nxt = accept(torch.cat([p, p]), q, [d], g)
        counts[d if kept else nxt] += 1
        kept, nxt = accept(torch.cat([p, p]), None, [3], g)  # a deterministic draft always guessing token 3
        det[3 if kept else nxt] += 1
    for c in (counts, det):  # within 4 standard deviations of a binomial count, for every token
        sd = (n * p[0] * (1 - p[0])).sqrt()
        assert ((c - n * p[0]).abs() <= 4 * sd + 1).all(), c / n


def test_sampling_is_reproducible_with_a_seed_and_refuses_bad_arguments():
    target, draft = tiny_model("tiny-gqa", seed=0), tiny_model("tiny-gqa", seed=1, n_layers=1)

    def run(seed):
        return list(speculative_generate(target, [4, 5, 6], 20, ModelDraft(draft), k=3, temperature=1.0, top_k=50,
                                         generator=torch.Generator().manual_seed(seed)))
    assert run(1) == run(1) and run(1) != run(2) and len(run(1)) == 20
    with pytest.raises(ValueError, match="temperature"):
        list(speculative_generate(target, [1], 5, LookupDraft(), temperature=float("nan")))
