"""minllama.quant: int8, int4, NF4, fp8 and GGUF-block weights for MinimalLlama, applied by swapping modules.

    from minllama.quant import quantize, load_pretrained_quantized, save_quantized, load_quantized
    quantize(model, "int8")                      # or "int4" (group_size=32/64/128), "nf4", "fp8", "q8_0", ...
    model, tok = load_gguf_quantized()           # the embedded SmolLM2 GGUF, run from its Q4_1/Q8_0 blocks
    model, tok = load_pretrained_quantized("smollm2-135m-instruct", "int8")   # quantized as it loads: no fp32 copy
"""
from .gguf_model import load_gguf_quantized
from .linear import (FP8Linear, GGUFLinear, Int4Linear, Int8Linear, NF4Linear, QuantEmbedding, QuantLinear)
from .model import (SCHEMES, QuantizationError, load_pretrained_quantized, load_quantized, model_bytes, prepare,
                    quantize, quantized_modules, save_quantized, set_path)

__all__ = ["quantize", "load_pretrained_quantized", "save_quantized", "load_quantized", "load_gguf_quantized",
           "prepare", "set_path", "model_bytes", "quantized_modules", "SCHEMES", "QuantizationError", "QuantLinear",
           "Int8Linear", "Int4Linear", "NF4Linear", "FP8Linear", "GGUFLinear", "QuantEmbedding"]
