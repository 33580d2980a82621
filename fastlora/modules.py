"""nn.Linear drop-ins with a LoRA adapter: :class:`LoRALinear`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import lora_linear
from .validation import INITS, check_init, check_lora_hyperparameters, lora_scaling, pissa_niter

class MergeableLinear(nn.Linear):
    """Merge / unmerge / to_linear for an ``nn.Linear`` whose adapter update is
    ``self.delta_weight()`` [out, in] (LoRA, VeRA, AdaLoRA layers): the update is
    added in its own precision (float32 for 16-bit weights) and rounded once to
    the weight's dtype. The base weight is shared with the nn.Linear the layer was
    made from, so that module sees a merged weight too (as with PEFT)."""

    merged: bool

    def delta_weight(self) -> Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def to_base(self) -> nn.Module:
        """The registry's name for :meth:`to_linear` (every adapter layer has one)."""
        return self.to_linear()

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight (rounded once to the weight's dtype);
        later forwards skip the adapter branch."""
        if self.merged:
            return
        delta = self.delta_weight()
        self.weight.copy_((self.weight.to(delta.dtype) + delta).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (exact up to the weight dtype's rounding)."""
        if not self.merged:
            return
        delta = self.delta_weight()
        self.weight.copy_((self.weight.to(delta.dtype) - delta).to(self.weight.dtype))
        self.merged = False

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update merged in (new tensors; this layer is unchanged)."""
        out = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype
        )
        weight = self.weight.detach()
        if not self.merged:
            delta = self.delta_weight()
            weight = (weight.to(delta.dtype) + delta).to(self.weight.dtype)
        out.weight.copy_(weight)
        if self.bias is not None:
            out.bias.copy_(self.bias)
            out.bias.requires_grad_(self.bias.requires_grad)
        out.weight.requires_grad_(self.weight.requires_grad)
        out.train(self.training)
        return out


class LoRALinear(MergeableLinear):
    """``nn.Linear`` with a frozen base weight and a trainable low-rank update.

    ``y = x W^T + scaling * dropout(x) A^T B^T + bias`` with ``lora_A`` [r, in]
    and ``lora_B`` [out, r]; ``scaling = alpha / r`` (``alpha / sqrt(r)`` with
    ``use_rslora``). A subclass of ``nn.Linear``, so code that checks for one
    keeps working; ``weight`` and ``bias`` are frozen, only ``lora_A`` and
    ``lora_B`` require grad. Initialised as PEFT does (A kaiming-uniform with
    a=sqrt(5), B zeros), so a fresh layer computes exactly its base layer.

    Adapters may be float32 on a bf16/fp16 base (PEFT's mixed precision): the
    LoRA branch and the adapter gradients are then computed in float32.
    """

    is_adapter_layer = True  # apply_lora / apply_vera never wrap it again

    # Variants that live in their own modules register here (``"dora"``:
    # fastlora.dora.DoRALinear), so that PEFT's spelling ``LoRALinear(...,
    # use_dora=True)`` builds the subclass without this module importing it.
    variants: dict[str, type] = {}

    @classmethod
    def register_variant(cls, name: str, subclass: type) -> None:
        """Make ``use_<name>=True`` build ``subclass`` (a subclass of this class)."""
        if not issubclass(subclass, cls):
            raise TypeError(f"register_variant: {subclass.__name__} is not a subclass of {cls.__name__}")
        cls.variants[name] = subclass

    @classmethod
    def _variant(cls, name: str) -> type:
        sub = cls.variants.get(name)
        if sub is None:
            raise RuntimeError(f"the {name!r} variant of LoRALinear is not registered (import fastlora first)")
        return cls if issubclass(cls, sub) else sub

    def __new__(cls, *args, use_dora: bool = False, **kwargs):
        # NOTE: __init__ then runs on the subclass.
        return super().__new__(cls._variant("dora") if use_dora else cls)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        use_dora: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        check_lora_hyperparameters(r, alpha, dropout)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._setup_lora(r, alpha, dropout, use_rslora, init)

    def _setup_lora(self, r: int, alpha: float, dropout: float, use_rslora: bool, init: str) -> None:
        check_init(init)
        self.r = r
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.merged = False
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.reset_lora_parameters(init)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default") -> None:
        """Initialise ``lora_A`` [r, in] and ``lora_B`` [out, r] as PEFT does.

        ``"default"``: A kaiming-uniform (a=sqrt(5)), B = 0. ``"gaussian"``:
        A ~ N(0, std=1/r), B = 0. Both start with a zero update.

        ``"pissa"`` (PiSSA, arXiv:2404.02948): ``W = U S V^T`` (exact SVD; with
        ``"pissa_niter_<N>"`` the randomized ``torch.svd_lowrank`` with N subspace
        iterations, which draws from the global RNG), ``S_r = S[:r] / scaling``,
        ``A = diag(sqrt(S_r)) V_r^T``, ``B = U_r diag(sqrt(S_r))``.
        ``"olora"`` (OLoRA, arXiv:2406.01775): ``W = Q R`` (reduced QR),
        ``A = R[:r]``, ``B = Q[:, :r]`` (not divided by ``scaling``).

        For these two the base weight is then replaced **in place** by the residual
        ``W - scaling * B @ A``, so the layer's output is unchanged up to rounding.
        The weight is shared with the ``nn.Linear`` the layer was made from, which
        therefore holds the residual afterwards (PEFT does the same). As in PEFT
        the factorisation and the residual are computed in float32 (float64 for a
        float64 weight, which PEFT rejects) from the current weight, and A, B and
        the residual are rounded once to their dtypes; requires ``r <= min(in, out)``.
        """
        if init in ("default", "gaussian"):
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        else:
            self._init_from_base_weight(check_init(init))

    def _init_from_base_weight(self, init: str) -> None:
        """PiSSA / OLoRA (see :meth:`reset_lora_parameters`); runs under no_grad."""
        weight = self.weight
        if self.merged:
            raise RuntimeError(f"init={init!r} factorises the base weight: unmerge the layer first")
        if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"init={init!r} needs a float16/bfloat16/float32/float64 base weight, got {weight.dtype}")
        if self.r > min(self.in_features, self.out_features):
            raise ValueError(
                f"init={init!r} needs r <= min(in_features, out_features) = "
                f"{min(self.in_features, self.out_features)}, got r={self.r}"
            )
        scaling = self.scaling
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        w = weight.detach().to(acc)
        r = self.r
        if init == "olora":
            q, rr = torch.linalg.qr(w)  # w [out, in] = q [out, k] @ rr [k, in], k = min(out, in)
            lora_A, lora_B = rr[:r].contiguous(), q[:, :r].contiguous()
        else:
            if scaling <= 0:
                raise ValueError(f"init={init!r} takes sqrt(S / scaling): alpha must be > 0, got {self.alpha:g}")
            niter = pissa_niter(init)
            if niter is None:
                u, s, vh = torch.linalg.svd(w, full_matrices=False)  # w = u diag(s) vh, s descending
                u_r, s_r, vh_r = u[:, :r], s[:r], vh[:r]
            else:
                u_r, s_r, v_r = torch.svd_lowrank(w, r, niter=niter)
                vh_r = v_r.t()
            s_r = s_r / scaling
            lora_A = torch.diag(torch.sqrt(s_r)) @ vh_r  # [r, in]
            lora_B = u_r @ torch.diag(torch.sqrt(s_r))  # [out, r]
        # NOTE: same operation order as PEFT ((scaling * B) @ A, from the unrounded
        # factors) so that the residual matches PEFT's bit for bit.
        residual = w - scaling * lora_B @ lora_A
        self.lora_A.copy_(lora_A)
        self.lora_B.copy_(lora_B)
        weight.copy_(residual)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
        use_dora: bool = False,
    ) -> "LoRALinear":
        """Wrap ``linear``: its weight and bias are shared (not copied) and frozen.

        With ``init="pissa"``, ``"pissa_niter_<N>"`` or ``"olora"`` the shared weight
        is overwritten in place by the residual ``W - scaling * B @ A`` (see
        :meth:`reset_lora_parameters`), so ``linear`` alone no longer computes the
        original layer; the returned layer does (up to rounding). ``use_dora=True``
        returns a :class:`fastlora.dora.DoRALinear` (PEFT's ``use_dora``)."""
        if use_dora and cls._variant("dora") is not cls:
            return cls._variant("dora").from_linear(linear, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        check_lora_hyperparameters(r, alpha, dropout)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._setup_lora(r, alpha, dropout, use_rslora, init)
        self.train(linear.training)
        return self

    def reset_parameters(self) -> None:  # called by nn.Linear.__init__
        super().reset_parameters()
        if hasattr(self, "lora_A"):
            self.reset_lora_parameters()

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(
            x, self.weight, self.lora_A, self.lora_B, self.scaling, self.bias, dropout=self.dropout, training=self.training
        )

    def peft_tensors(self) -> dict[str, Tensor]:
        """This layer's entries of a PEFT adapter file, keyed relative to the module
        name (``lora_A.weight`` [r, in], ``lora_B.weight`` [out, r]); the live
        parameters, not copies."""
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``scaling * B @ A`` [out, in], computed in float32 (float64 for float64 weights)."""
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return (self.lora_B.to(acc) @ self.lora_A.to(acc)) * self.scaling

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}"
            + (", rslora=True" if self.use_rslora else "")
            + (", merged=True" if self.merged else "")
        )
