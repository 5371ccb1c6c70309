"""minllama.core: the Llama model, its configs, tokenizers, checkpoints and generation in plain PyTorch."""
from .checkpoint import CheckpointError, load_pretrained, save_hf, save_meta
from .config import LlamaConfig, RopeScaling
from .generate import generate, generate_stream, sample, stream_text
from .model import MinimalLlama

__all__ = ["CheckpointError", "LlamaConfig", "MinimalLlama", "RopeScaling", "generate", "generate_stream",
           "load_pretrained", "sample", "save_hf", "save_meta", "stream_text"]
