"""fastlora: fused LoRA / QLoRA linear layers (Triton kernels + a PyTorch reference path)."""

from ._backend import get_backend, set_backend, use_backend
from .adalora import AdaLoRAConfig, AdaLoRALinear, adalora_layers, apply_adalora, merge_adalora
from .adalora import RankAllocator as AdaLoRARankAllocator
from .dora import DoRALinear, QDoRALinear, dora_linear
from .functional import lora_linear
from .layers import LoRAConv1D, LoRAConv1d, LoRAConv2d, LoRAConv3d, LoRAEmbedding
from .loraplus import create_loraplus_optimizer, loraplus_param_groups
from .model import LoRAConfig, apply_lora, count_parameters, merge_lora
from .modules import LoRALinear
from .peft_io import load_adapter, save_adapter
from .peft_model import from_peft
from .qlora import QLoRALinear, qlora_linear
from .strategies import set_strategy, strategies, strategy_report  # NOTE: the function shadows the module name
from .vera import VeRAConfig, VeRALinear, VeRAProjection, apply_vera, merge_vera, vera_layers
from . import quant, registry

__version__ = "0.1.0"

__all__ = [
    "AdaLoRAConfig",
    "AdaLoRALinear",
    "AdaLoRARankAllocator",
    "DoRALinear",
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
    "adalora_layers",
    "apply_adalora",
    "apply_lora",
    "apply_vera",
    "count_parameters",
    "dora_linear",
    "create_loraplus_optimizer",
    "from_peft",
    "get_backend",
    "load_adapter",
    "lora_linear",
    "loraplus_param_groups",
    "merge_adalora",
    "merge_lora",
    "merge_vera",
    "qlora_linear",
    "quant",
    "registry",
    "save_adapter",
    "set_backend",
    "set_strategy",
    "strategies",
    "strategy_report",
    "use_backend",
    "vera_layers",
]
