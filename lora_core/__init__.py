"""lora_core: a small LoRA engine in plain PyTorch that reads and writes PEFT's adapter format.

    report = inject_lora(model, LoraConfig(r=8, target_modules=["query", "value"]))
    ...train...
    save_adapter(model, "out/adapter", base_model_name_or_path="bert-base-uncased")
    load_adapter(fresh_model, "out/adapter")          # or peft.PeftModel.from_pretrained
    plain = unload_lora(model)                         # merged, wrappers gone

Depends only on torch and safetensors (transformers' GPT-2 Conv1D is recognised by class name).
"""

from .config import LoraConfig, LoraError
from .dropout import use_fast_dropout
from .io import adapter_tensors, load_adapter, lora_state_dict, read_adapter_config, save_adapter
from .model import (
    InjectionReport,
    count_parameters,
    inject_lora,
    merge_lora,
    unload_lora,
    unmerge_lora,
)

__all__ = [
    "InjectionReport",
    "LoraConfig",
    "LoraError",
    "count_parameters",
    "inject_lora",
    "load_adapter",
    "lora_state_dict",
    "merge_lora",
    "read_adapter_config",
    "save_adapter",
    "adapter_tensors",
    "unload_lora",
    "unmerge_lora",
    "use_fast_dropout",
]
