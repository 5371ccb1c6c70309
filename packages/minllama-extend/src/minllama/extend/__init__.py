"""minllama.extend: longer context (RoPE scaling, LongLoRA's S²-Attn, streaming with attention sinks) and larger
vocabularies (SentencePiece and byte-level BPE extension), applied to a MinimalLlama from outside."""
from .rope_scaling import METHODS, RopeScalingMethod, save_hf_scaled, scale_rope, unscale_rope
from .s2_attn import ShiftedSparseAttention, disable_s2_attn, enable_s2_attn, shifted_sparse_attention
from .streaming import SinkKVCache, StreamingChat, streaming_forward, streaming_generate
from .vocab import (extend_bpe, extend_sentencepiece, merge_sentencepiece, resize_vocab, tokens_per_char,
                    train_only_new_rows, train_sentencepiece)

__all__ = ["METHODS", "RopeScalingMethod", "ShiftedSparseAttention", "SinkKVCache", "StreamingChat",
           "disable_s2_attn", "enable_s2_attn", "extend_bpe", "extend_sentencepiece", "merge_sentencepiece",
           "resize_vocab", "save_hf_scaled", "scale_rope", "shifted_sparse_attention", "streaming_forward",
           "streaming_generate", "tokens_per_char", "train_only_new_rows", "train_sentencepiece", "unscale_rope"]
