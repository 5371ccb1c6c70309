"""minllama.dist: distributed checkpoints (DCP), FSDP2 training with overlap, tensor-parallel generation, and
tensor-parallel (sequence- and loss-parallel) and pipeline-parallel training composed with FSDP on an N-D mesh, for
MinimalLlama, applied from outside to the unchanged single-device model. Launch with torchrun."""
from .checkpoint import (CheckpointManager, broadcast_full_state, check_checkpoint, core_to_dcp, dcp_to_hf,
                         dcp_to_meta, dcp_to_model, init_from_rank0, load_checkpoint, load_pretrained_sharded,
                         read_config, save_checkpoint)
from .fsdp import apply_activation_checkpointing, apply_fsdp, materialize, meta_model, set_prefetch
from .launch import data_parallel_mesh, init_distributed, pick_device, shutdown
from .mesh import MESH_DIMS, MeshShape, build_mesh, plan_mesh
from .parallelize import apply_tensor_parallel_training, check_tensor_parallel, parallelize_llama, tp_lm_loss
from .pipeline import (LlamaStage, Pipeline, build_pipeline, check_pipeline_args, cut_stage, pipeline_for_training,
                       pipeline_forward_backward, pipeline_mesh, pipeline_train_step, split_layers)
from .tp import apply_tensor_parallel
from .training import TokenBatches, lm_loss, train_step

__all__ = ["MESH_DIMS", "CheckpointManager", "LlamaStage", "MeshShape", "Pipeline", "TokenBatches",
           "apply_activation_checkpointing", "apply_fsdp", "apply_tensor_parallel", "apply_tensor_parallel_training",
           "broadcast_full_state", "build_mesh", "build_pipeline", "check_checkpoint", "check_pipeline_args",
           "check_tensor_parallel", "core_to_dcp", "cut_stage", "data_parallel_mesh", "dcp_to_hf", "dcp_to_meta",
           "dcp_to_model", "init_distributed", "init_from_rank0", "lm_loss", "load_checkpoint",
           "load_pretrained_sharded", "materialize", "meta_model", "parallelize_llama", "pick_device",
           "pipeline_for_training", "pipeline_forward_backward", "pipeline_mesh", "pipeline_train_step",
           "plan_mesh", "read_config", "save_checkpoint", "set_prefetch", "shutdown", "split_layers",
           "tp_lm_loss", "train_step"]
