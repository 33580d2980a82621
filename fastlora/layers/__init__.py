"""Adapter layers for every layer kind PEFT's LoRA adapts besides ``nn.Linear``.

Importing this package registers each with the LoRA kind
(:func:`fastlora.registry.register_layer`), so ``fastlora.apply_lora`` wraps the
modules ``target_modules`` selects, ``merge_lora`` merges them and
``count_parameters`` counts them:

* transformers ``Conv1D`` (GPT-2; weight [in, out]) -> :class:`LoRAConv1D`, on
  the fused LoRA op with the weight's transposed view; with ``quantize`` a
  :class:`fastlora.QLoRALinear` on the transposed weight;
* ``nn.Embedding`` -> :class:`LoRAEmbedding` (``lora_embedding_A`` / ``_B``);
* ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` -> :class:`LoRAConv1d` /
  :class:`LoRAConv2d` / :class:`LoRAConv3d`.
"""

from .conv import LoRAConv1d, LoRAConv2d, LoRAConv3d, LoRAConvNd
from .conv1d import LoRAConv1D
from .embedding import LoRAEmbedding

__all__ = ["LoRAConv1D", "LoRAConv1d", "LoRAConv2d", "LoRAConv3d", "LoRAConvNd", "LoRAEmbedding"]
