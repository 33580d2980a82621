"""fastlora: fused LoRA / QLoRA linear layers (Triton kernels + a PyTorch reference path)."""

from ._backend import get_backend, set_backend, use_backend
from .adapters import (
    active_adapters,
    add_adapter,
    add_weighted_adapter,
    delete_adapter,
    disable_adapter,
    mixed_batch,
    set_adapter,
)
from .adalora import AdaLoRAConfig, AdaLoRALinear, adalora_layers, apply_adalora, merge_adalora
from .adalora import RankAllocator as AdaLoRARankAllocator
from .dora import DoRALinear, QDoRALinear, dora_linear
from .functional import lora_linear
from .layers import LoRAConv1D, LoRAConv1d, LoRAConv2d, LoRAConv3d, LoRAEmbedding
from .loraplus import create_loraplus_optimizer, loraplus_param_groups
from .model import LoRAConfig, apply_lora, count_parameters, merge_lora, unmerge_lora
from .modules import LoRAAdapter, LoRALinear
from .multi import lora_linear_multi, qlora_linear_multi
from .peft_io import load_adapter, save_adapter
from .peft_model import PeftFallbackWarning, fallback_counts, from_peft, reset_fallback_counts
from .qlora import QLoRALinear, qlora_linear
from .strategies import set_strategy, strategies, strategy_report  # NOTE: the function shadows the module name
from .vera import VeRAConfig, VeRALinear, VeRAProjection, apply_vera, merge_vera, vera_layers
from . import adapters, quant, registry

__version__ = "0.1.0"

__all__ = [
    "AdaLoRAConfig",
    "AdaLoRALinear",
    "AdaLoRARankAllocator",
    "DoRALinear",
    "LoRAAdapter",
    "LoRAConfig",
    "LoRAConv1D",
    "LoRAConv1d",
    "LoRAConv2d",
    "LoRAConv3d",
    "LoRAEmbedding",
    "LoRALinear",
    "QDoRALinear",
    "QLoRALinear",
    "VeRAConfig",
    "VeRALinear",
    "VeRAProjection",
    "active_adapters",
    "adalora_layers",
    "adapters",
    "add_adapter",
    "add_weighted_adapter",
    "apply_adalora",
    "apply_lora",
    "apply_vera",
    "count_parameters",
    "dora_linear",
    "create_loraplus_optimizer",
    "delete_adapter",
    "disable_adapter",
    "PeftFallbackWarning",
    "fallback_counts",
    "from_peft",
    "reset_fallback_counts",
    "get_backend",
    "load_adapter",
    "lora_linear",
    "lora_linear_multi",
    "loraplus_param_groups",
    "merge_adalora",
    "merge_lora",
    "merge_vera",
    "mixed_batch",
    "qlora_linear",
    "qlora_linear_multi",
    "quant",
    "registry",
    "save_adapter",
    "set_adapter",
    "set_backend",
    "set_strategy",
    "strategies",
    "strategy_report",
    "unmerge_lora",
    "use_backend",
    "vera_layers",
]
