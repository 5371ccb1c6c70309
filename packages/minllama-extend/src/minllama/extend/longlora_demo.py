"""LongLoRA in miniature: a tiny model trained on 64 tokens learns to work on 256, training with S²-Attn.

The task: a random block of 16 tokens repeated until the sequence is full; after the first block every token is
predictable by looking back 16 positions, so the model must know distances precisely. Steps:

1. train a tiny Llama on 64-token sequences (its "pretraining context");
2. at 256 tokens: plain RoPE (positions never seen) and position interpolation (PI, ``scale_rope("linear", 4)``,
   every position squeezed 4x) without training, for reference;
3. PI + a short finetune at 256 tokens with S²-Attn in groups of 128 (half the attention cost), then evaluate at
   256 tokens with ordinary full attention.

On this toy, groups of 64 (a quarter of the length) train well under S²-Attn but do *not* transfer to full
attention: the loss with full attention grows while the grouped loss falls. Groups of half the length transfer.
A two-layer model has little to carry information across groups; LongLoRA's quarter-length groups are measured
on 7B+ models.

    python -m minllama.extend.longlora_demo      # a few minutes on one CPU core
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from minllama.core.config import LlamaConfig
from minllama.core.model import MinimalLlama

from .rope_scaling import scale_rope
from .s2_attn import disable_s2_attn, enable_s2_attn

SHORT, LONG, GROUP, VOCAB = 64, 256, 128, 64
PERIOD = 16  # every sequence repeats a random block of this many tokens
SKIP = PERIOD  # the first block is random: no loss on it


def repeated_blocks(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, length) rows, each a random block of PERIOD tokens repeated."""
    rows = []
    for _ in range(batch):
        period = PERIOD
        block = torch.randint(0, VOCAB, (period,), generator=generator)
        rows.append(block.repeat(length // period + 1)[:length])
    return torch.stack(rows)


def loss_on(model: MinimalLlama, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits[:, SKIP:].flatten(0, 1), tokens[:, SKIP + 1:].flatten())


def train(model: MinimalLlama, length: int, steps: int, generator: torch.Generator, lr: float = 3e-3,
          batch: int = 16) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = loss_on(model, repeated_blocks(batch, length + 1, generator))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def evaluate(model: MinimalLlama, length: int, seed: int = 123) -> float:
    return loss_on(model, repeated_blocks(64, length + 1, torch.Generator().manual_seed(seed))).item()


def run_demo(seed: int = 0, pretrain_steps: int = 300, finetune_steps: int = 300, verbose: bool = False) -> dict:
    """Returns the validation losses: base_short, base_long, pi_long, finetuned_long (nats per token)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                      max_seq_len=SHORT + 1)
    base = MinimalLlama(cfg)
    base.init_weights()
    train(base, SHORT, pretrain_steps, g)
    r = {"base_short": evaluate(base, SHORT)}
    plain_long = scale_rope(copy.deepcopy(base), "linear", 1.0, max_seq_len=LONG + 1)  # unscaled, longer table
    r["base_long"] = evaluate(plain_long, LONG)
    model = scale_rope(copy.deepcopy(base), "linear", LONG / SHORT, original_max_seq_len=SHORT,
                       max_seq_len=LONG + 1)
    r["pi_long"] = evaluate(model, LONG)
    enable_s2_attn(model, GROUP)
    train(model, LONG, finetune_steps, g, lr=3e-3, batch=8)
    disable_s2_attn(model)  # inference: full attention, plain model
    r["finetuned_long"] = evaluate(model, LONG)
    if verbose:
        for k, v in r.items():
            print(f"{k:>15}: {v:.3f} nats/token")
    return r


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_demo(verbose=True)
