"""minllama.peft: LoRA and DoRA adapters for MinimalLlama, QLoRA- and FSDP-ready, in Hugging Face PEFT's format."""
from .base import dense_weight, is_linear_like, linear_shape
from .hf_format import load_adapter, read_adapter_config, save_adapter
from .lora import (AdapterError, LoraConfig, LoraLinear, adapter_config, adapter_names, adapter_parameters,
                   adapter_state_dict, add_adapter, apply_lora, delete_adapter, disabled_adapters,
                   mark_only_adapters_trainable, merge, merge_and_unload, set_adapter, trainable_parameter_count,
                   unmerge)

__all__ = ["AdapterError", "LoraConfig", "LoraLinear", "adapter_config", "adapter_names", "adapter_parameters",
           "adapter_state_dict", "add_adapter", "apply_lora", "delete_adapter", "dense_weight", "disabled_adapters",
           "is_linear_like", "linear_shape", "load_adapter", "mark_only_adapters_trainable", "merge",
           "merge_and_unload", "read_adapter_config", "save_adapter", "set_adapter", "trainable_parameter_count",
           "unmerge"]
