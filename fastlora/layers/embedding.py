"""LoRA on ``nn.Embedding``: :class:`LoRAEmbedding`.

PEFT's layout and semantics (0.21, ``peft.tuners.lora.Embedding``):
``lora_embedding_A`` [r, num_embeddings] and ``lora_embedding_B``
[embedding_dim, r], initialised A = 0 and B ~ N(0, 1) (the original LoRA code's
choice for embeddings; ``init="gaussian"`` is the same for this kind), and

    ``y = W0[ids] + scaling * (A^T[ids]) B^T``

where both lookups use the base module's ``padding_idx``, ``max_norm``,
``norm_type`` and ``scale_grad_by_freq``. So, as in PEFT, the adapter gets no
gradient at ``padding_idx``, and ``max_norm`` renormalises the looked-up
columns of ``lora_embedding_A`` in place (as it does the base weight's rows).
PEFT creates a dropout module for embeddings but never applies it: dropout is
kept as an attribute (the adapter file's ``lora_dropout``) and not applied here
either. The merge adds ``scaling * (B @ A)^T`` [num_embeddings, embedding_dim].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import LoRAConfig
from ..registry import register_layer
from ._common import AdapterLayer, accumulation_dtype, check_builder_config, check_plain_forward, check_simple_init


class LoRAEmbedding(AdapterLayer):
    """``nn.Embedding`` with a frozen, shared base table and a trainable LoRA update.

    ``weight`` [num_embeddings, embedding_dim] (shared with the wrapped module,
    frozen), ``lora_embedding_A`` [r, num_embeddings], ``lora_embedding_B``
    [embedding_dim, r] (PEFT's names and shapes; ``lora_A`` / ``lora_B`` are the
    same parameters under the names every LoRA layer has, and ``in_features`` /
    ``out_features`` are ``num_embeddings`` / ``embedding_dim``). See the module
    docstring for the forward, the init and what ``padding_idx`` / ``max_norm``
    do. ``sparse=True`` bases keep it for their own (frozen) weight; the adapter
    gradients are dense (PEFT's backward fails on a sparse base).
    """

    def __init__(
        self,
        embedding: nn.Embedding,
        *,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
    ) -> None:
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        check_plain_forward(embedding, nn.Embedding, "LoRAEmbedding")
        check_simple_init(init, "LoRAEmbedding")
        super().__init__()
        self._setup_hyperparameters(r, alpha, dropout, use_rslora)
        self.num_embeddings = embedding.num_embeddings
        self.embedding_dim = embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.max_norm = embedding.max_norm
        self.norm_type = embedding.norm_type
        self.scale_grad_by_freq = embedding.scale_grad_by_freq
        self.sparse = embedding.sparse
        self.weight = embedding.weight
        self.weight.requires_grad_(False)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_embedding_A = nn.Parameter(torch.empty(r, self.num_embeddings, **factory))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.embedding_dim, r, **factory))
        self.reset_lora_parameters(init)
        self.train(embedding.training)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, **kwargs) -> "LoRAEmbedding":
        """Wrap ``embedding`` (weight shared, not copied, and frozen); the keyword
        arguments are ``r``, ``alpha``, ``dropout`` (kept, not applied: PEFT's
        semantics), ``use_rslora`` and ``init`` (``"default"`` or ``"gaussian"``)."""
        return cls(embedding, **kwargs)

    @property
    def in_features(self) -> int:
        return self.num_embeddings

    @property
    def out_features(self) -> int:
        return self.embedding_dim

    @property
    def lora_A(self) -> nn.Parameter:
        """``lora_embedding_A`` [r, num_embeddings] (the A of ``y = s * onehot(ids) A^T B^T``)."""
        return self.lora_embedding_A

    @property
    def lora_B(self) -> nn.Parameter:
        """``lora_embedding_B`` [embedding_dim, r]."""
        return self.lora_embedding_B

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default") -> None:
        """PEFT's init for embeddings (both ``"default"`` and ``"gaussian"``): A = 0, B ~ N(0, 1)."""
        check_simple_init(init, "LoRAEmbedding")
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def _lookup(self, ids: Tensor, table: Tensor, sparse: bool) -> Tensor:
        return F.embedding(
            ids, table, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, sparse
        )

    def forward(self, ids: Tensor) -> Tensor:
        y = self._lookup(ids, self.weight, self.sparse)
        if self.merged:
            return y
        # NOTE: PEFT's expression and order ((A^T[ids] @ B^T) * s, then the sum in
        # the promoted dtype, cast back to the base's), so fp32 adapters on a 16-bit
        # table give PEFT's numbers; the adapter lookup is always dense.
        after_a = self._lookup(ids, self.lora_embedding_A.t(), False)
        return (y + (after_a @ self.lora_embedding_B.t()) * self.scaling).to(y.dtype)

    def peft_tensors(self) -> dict[str, Tensor]:
        """PEFT's keys for an embedding adapter (bare parameters, no ``.weight``):
        ``lora_embedding_A`` [r, num_embeddings], ``lora_embedding_B`` [embedding_dim, r]."""
        return {"lora_embedding_A": self.lora_embedding_A, "lora_embedding_B": self.lora_embedding_B}

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``scaling * (B @ A)^T`` [num_embeddings, embedding_dim], float32 (float64 for float64 tables)."""
        acc = accumulation_dtype(self.weight)
        return ((self.lora_embedding_B.to(acc) @ self.lora_embedding_A.to(acc)) * self.scaling).t()

    def _new_base(self, weight: Tensor) -> nn.Embedding:
        # NOTE: _weight skips nn.Embedding's init (and its zeroing of padding_idx's row).
        return nn.Embedding(
            self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, max_norm=self.max_norm,
            norm_type=self.norm_type, scale_grad_by_freq=self.scale_grad_by_freq, sparse=self.sparse,
            _weight=weight, _freeze=not self.weight.requires_grad,
        )  # fmt: skip

    def extra_repr(self) -> str:
        extra = "".join(
            f", {k}={getattr(self, k)}"
            for k, default in (("padding_idx", None), ("max_norm", None), ("scale_grad_by_freq", False), ("sparse", False))
            if getattr(self, k) != default
        )
        return f"{self.num_embeddings}, {self.embedding_dim}{extra}, " + self._hyper_repr()


def _build_embedding(embedding: nn.Embedding, name: str, config: LoRAConfig, shared) -> LoRAEmbedding:
    check_builder_config(config, name, embedding, "LoRAEmbedding")
    return LoRAEmbedding.from_embedding(embedding, **config.layer_kwargs(name))


register_layer(LoRAConfig, nn.Embedding, _build_embedding, LoRAEmbedding, by_default=False)

__all__ = ["LoRAEmbedding"]
