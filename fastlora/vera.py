"""VeRA (Vector-based Random Matrix Adaptation, Kopiczko et al. 2023,
https://arxiv.org/abs/2310.11454) on fastlora's fused LoRA op.

One pair of frozen random matrices is shared by every adapted layer of a
model: ``vera_A`` [r, max_in] and ``vera_B`` [max_out, r], sized to the largest
targeted layer and sliced per layer. Each layer trains two vectors only,
``vera_lambda_d`` [r] (init ``d_initial``, 0.1) and ``vera_lambda_b`` [out]
(init 0, so a fresh layer computes exactly its base layer):

  ``y = x W^T + lambda_b * (B_s (lambda_d * (A_s D(x))))  + bias``
  ``  = x W^T + D(x) (diag(lambda_d) A_s)^T (diag(lambda_b) B_s)^T + bias``

with ``A_s = vera_A[:r, :in]``, ``B_s = vera_B[:out, :r]`` and D the dropout
(training only). The second line is a LoRA layer with
``lora_A = lambda_d[:, None] * A_s`` [r, in], ``lora_B = lambda_b[:, None] * B_s``
[out, r] and scaling 1, so the forward and backward run on
:func:`fastlora.lora_linear` (the Triton kernels on GPU); autograd through the
two small products gives ``d lambda_d = rowsum(dA * A_s)`` and
``d lambda_b = rowsum(dB * B_s)``.

Semantics and names follow PEFT's ``peft.tuners.vera`` (``VeraConfig``,
``vera_lambda_d`` / ``vera_lambda_b``, ``vera_A`` / ``vera_B``): the
projections for a given ``projection_prng_key`` are the same numbers PEFT
generates (a CPU ``torch.Generator`` seeded with the key draws ``vera_A`` then
``vera_B``, each kaiming-uniform with gain sqrt(2) and fan-in = its second
dimension), and merge adds ``(lambda_b B_s) @ (lambda_d A_s)`` as PEFT does.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import lora_linear
from .modules import MergeableLinear
from .registry import adapter_layers, apply_adapter, merge_adapters, normalize_target_modules, register_adapter_kind, register_layer
from .validation import check_dropout, check_finite, check_rank, is_int


def _check_vera_args(r, d_initial, dropout) -> None:
    check_rank(r, "r (the VeRA rank)")
    check_finite(d_initial, "d_initial")
    check_dropout(dropout)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Kaiming-uniform, gain sqrt(2), fan-in = ``shape[1]``, drawn from ``generator``.

    NOTE: the same tensor (default dtype, on CPU), the same bound arithmetic and
    the same ``uniform_`` call as PEFT's ``vera.model._kaiming_init``, so the
    numbers are bit-identical to PEFT's for the same generator state.
    """
    tensor = torch.empty(shape, dtype=torch.get_default_dtype(), device="cpu")
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


class VeRAProjection(nn.Module):
    """The frozen random matrices shared by a model's VeRA layers.

    Buffers ``vera_A`` [r, in_features] and ``vera_B`` [out_features, r] (the
    largest sizes of the layers that share them). Every :class:`VeRALinear`
    holds *this module* (not copies of its tensors), so ``model.to(...)``
    converts the matrices once and the layers keep sharing one storage.
    ``persistent=False`` leaves them out of ``state_dict`` (PEFT's
    ``save_projection=False``: they are regenerated from the key instead).
    """

    def __init__(self, vera_A: Tensor, vera_B: Tensor, *, persistent: bool = True) -> None:
        super().__init__()
        for name, t in (("vera_A", vera_A), ("vera_B", vera_B)):
            if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 2:
                raise ValueError(
                    f"{name} must be a 2-D floating-point tensor, got "
                    + (f"shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__)
                )
        if vera_A.shape[0] != vera_B.shape[1]:
            raise ValueError(
                f"vera_A [r, in_features] and vera_B [out_features, r] must share r: got vera_A of shape "
                f"{tuple(vera_A.shape)} and vera_B of shape {tuple(vera_B.shape)}"
            )
        if vera_A.shape[0] < 1 or vera_A.shape[1] < 1 or vera_B.shape[0] < 1:
            raise ValueError(f"empty projection: vera_A {tuple(vera_A.shape)}, vera_B {tuple(vera_B.shape)}")
        if vera_A.dtype != vera_B.dtype or vera_A.device != vera_B.device:
            raise ValueError(
                f"vera_A and vera_B must share dtype and device, got {vera_A.dtype}/{vera_A.device} and "
                f"{vera_B.dtype}/{vera_B.device}"
            )
        self.register_buffer("vera_A", vera_A.detach(), persistent=persistent)
        self.register_buffer("vera_B", vera_B.detach(), persistent=persistent)

    @classmethod
    def generate(
        cls, r: int, in_features: int, out_features: int, projection_prng_key: int = 0, *, persistent: bool = True
    ) -> VeRAProjection:
        """PEFT's projections for ``projection_prng_key``: ``vera_A`` [r, in_features]
        then ``vera_B`` [out_features, r] from one seeded CPU generator."""
        _check_vera_args(r, 0.0, 0.0)
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(projection_prng_key, bool) or not isinstance(projection_prng_key, int):
            raise TypeError(f"projection_prng_key must be an int, got {projection_prng_key!r}")
        generator = torch.Generator(device="cpu").manual_seed(projection_prng_key)
        vera_A = _kaiming_uniform((r, in_features), generator)
        vera_B = _kaiming_uniform((out_features, r), generator)
        return cls(vera_A, vera_B, persistent=persistent)

    @property
    def r(self) -> int:
        return self.vera_A.shape[0]

    @property
    def in_features(self) -> int:
        return self.vera_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.vera_B.shape[0]

    def extra_repr(self) -> str:
        return f"r={self.r}, in_features={self.in_features}, out_features={self.out_features}"


class VeRALinear(MergeableLinear):
    """``nn.Linear`` with a frozen base weight and a VeRA update (see the module docstring).

    ``y = x W^T + D(x) (lambda_d[:, None] A_s)^T (lambda_b[:, None] B_s)^T + bias``
    with ``A_s = projection.vera_A[:r, :in]``, ``B_s = projection.vera_B[:out, :r]``.
    Trainable: ``vera_lambda_d`` [r] and ``vera_lambda_b`` [out] (float32, or
    float64 on a float64 base, as PEFT keeps them). ``weight``, ``bias`` and the
    projection are frozen. A subclass of ``nn.Linear``, like
    :class:`fastlora.LoRALinear`.
    """

    is_adapter_layer = True  # apply_lora / apply_vera never wrap it again

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int | None = None,
        projection: VeRAProjection | None = None,
        projection_prng_key: int = 0,
        d_initial: float = 0.1,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        """A fresh layer. ``r`` defaults to ``projection``'s rank; without
        ``projection``, one of rank ``r`` (default 256) is generated for this
        layer's sizes from ``projection_prng_key`` (PEFT's numbers for a model
        whose largest targeted layer is this one)."""
        if projection is not None and not isinstance(projection, VeRAProjection):
            raise TypeError(f"projection must be a fastlora.vera.VeRAProjection, got {type(projection).__name__}")
        r = (256 if projection is None else projection.r) if r is None else r
        _check_vera_args(r, d_initial, dropout)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        if projection is None:
            projection = VeRAProjection.generate(r, in_features, out_features, projection_prng_key)
        self._setup_vera(projection, r, d_initial, dropout)

    def _setup_vera(self, projection: VeRAProjection, r: int, d_initial: float, dropout: float) -> None:
        if not isinstance(projection, VeRAProjection):
            raise TypeError(f"projection must be a fastlora.vera.VeRAProjection, got {type(projection).__name__}")
        if projection.r < r or projection.in_features < self.in_features or projection.out_features < self.out_features:
            raise ValueError(
                f"the shared VeRA projection (vera_A {tuple(projection.vera_A.shape)}, vera_B "
                f"{tuple(projection.vera_B.shape)}) is too small for a layer with in_features={self.in_features}, "
                f"out_features={self.out_features}, r={r}: it needs vera_A of at least [{r}, {self.in_features}] and "
                f"vera_B of at least [{self.out_features}, {r}] (size the projection to the largest layer)"
            )
        self.r = r
        self.d_initial = float(d_initial)
        self.dropout = float(dropout)
        self.merged = False
        # NOTE: a registered submodule shared by every layer (PEFT shares one
        # BufferDict the same way): state_dict lists it under each layer, but the
        # tensors are one storage, and .to() / .cuda() keep it so.
        self.vera_projection = projection
        factory = {"device": self.weight.device, "dtype": torch.float64 if self.weight.dtype == torch.float64 else torch.float32}
        self.vera_lambda_d = nn.Parameter(torch.empty(r, **factory))
        self.vera_lambda_b = nn.Parameter(torch.empty(self.out_features, **factory))
        self.reset_vera_parameters()

    @torch.no_grad()
    def reset_vera_parameters(self, d_initial: float | None = None) -> None:
        """PEFT's init: ``lambda_d = d_initial`` (default: this layer's), ``lambda_b = 0``."""
        if d_initial is not None:
            _check_vera_args(self.r, d_initial, self.dropout)
            self.d_initial = float(d_initial)
        self.vera_lambda_d.fill_(self.d_initial)
        self.vera_lambda_b.zero_()

    def reset_parameters(self) -> None:  # called by nn.Linear.__init__
        super().reset_parameters()
        if hasattr(self, "vera_lambda_d"):
            self.reset_vera_parameters()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        projection: VeRAProjection | None = None,
        *,
        r: int | None = None,
        projection_prng_key: int = 0,
        d_initial: float = 0.1,
        dropout: float = 0.0,
    ) -> VeRALinear:
        """Wrap ``linear``: its weight and bias are shared (not copied) and frozen.

        ``projection`` is the model's shared :class:`VeRAProjection` (it must be
        at least this layer's size); ``r`` defaults to its rank. Without one, a
        projection of rank ``r`` (default 256) is generated for this layer alone.
        The projection is moved to the weight's device (in place, so other
        layers sharing it see the same tensors).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, VeRALinear):
            raise TypeError("linear is already a VeRALinear")
        if projection is None:
            r = 256 if r is None else r
            _check_vera_args(r, d_initial, dropout)
            projection = VeRAProjection.generate(r, linear.in_features, linear.out_features, projection_prng_key)
        elif not isinstance(projection, VeRAProjection):
            raise TypeError(f"projection must be a fastlora.vera.VeRAProjection, got {type(projection).__name__}")
        r = projection.r if r is None else r
        _check_vera_args(r, d_initial, dropout)
        if projection.vera_A.device != linear.weight.device:
            projection.to(linear.weight.device)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._setup_vera(projection, r, d_initial, dropout)
        self.train(linear.training)
        return self

    def _sliced(self) -> tuple[Tensor, Tensor]:
        """``A_s = vera_A[:r, :in]`` [r, in] and ``B_s = vera_B[:out, :r]`` [out, r] (views)."""
        p = self.vera_projection
        return p.vera_A[: self.r, : self.in_features], p.vera_B[: self.out_features, : self.r]

    def scaled_adapters(self) -> tuple[Tensor, Tensor]:
        """``(lambda_d[:, None] * A_s, lambda_b[:, None] * B_s)``: the [r, in] and
        [out, r] LoRA factors this layer computes with (autograd-tracked)."""
        vera_A, vera_B = self._sliced()
        dtype = self.vera_lambda_d.dtype
        return self.vera_lambda_d[:, None] * vera_A.to(dtype), self.vera_lambda_b[:, None] * vera_B.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        lora_A, lora_B = self.scaled_adapters()
        return lora_linear(x, self.weight, lora_A, lora_B, 1.0, self.bias, dropout=self.dropout, training=self.training)

    def peft_tensors(self) -> dict[str, Tensor]:
        """This layer's entries of a PEFT VeRA adapter file (the shared projections are
        stored once per model, as ``base_model.vera_A`` / ``vera_B``)."""
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    @torch.no_grad()
    def delta_weight(self) -> Tensor:
        """``(lambda_b[:, None] * B_s) @ (lambda_d[:, None] * A_s)`` [out, in], as PEFT's
        ``get_delta_weight`` computes it (float32; float64 for float64 lambdas)."""
        lora_A, lora_B = self.scaled_adapters()
        return lora_B @ lora_A

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, d_initial={self.d_initial:g}, dropout={self.dropout:g}"
            + (", merged=True" if self.merged else "")
        )


@dataclass
class VeRAConfig:
    """What :func:`apply_vera` does; fields follow PEFT's ``VeraConfig``
    (``dropout`` is PEFT's ``vera_dropout``).

    r: the rank of the shared projections (PEFT's default 256; VeRA wants
    larger ranks than LoRA, its parameters grow with ``r`` by one number per layer).
    target_modules / exclude_modules / modules_to_save: as for
    :class:`fastlora.LoRAConfig` (PEFT's spellings).
    projection_prng_key: seed of the shared projections (PEFT's numbers).
    d_initial: the initial value of every ``lambda_d``.
    save_projection: keep the projections in ``state_dict`` (PEFT's default);
    ``False`` makes them non-persistent buffers, regenerated from the key.
    """

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    d_initial: float = 0.1
    dropout: float = 0.0
    save_projection: bool = True
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        _check_vera_args(self.r, self.d_initial, self.dropout)
        if not is_int(self.projection_prng_key):
            raise TypeError(f"VeRAConfig.projection_prng_key must be an int, got {self.projection_prng_key!r}")
        self.target_modules = normalize_target_modules(self.target_modules)


def vera_layers(model: nn.Module) -> dict[str, VeRALinear]:
    """The model's :class:`VeRALinear` layers by module name."""
    return adapter_layers(model, "vera")


def _prepare_projection(model: nn.Module, config: VeRAConfig, bases: dict, projection) -> VeRAProjection:
    """PEFT's shared projections sized to the largest targeted layer, or the given ones checked."""
    max_out = max(m.out_features for m in bases.values())
    max_in = max(m.in_features for m in bases.values())
    if projection is None:
        return VeRAProjection.generate(config.r, max_in, max_out, config.projection_prng_key, persistent=config.save_projection)
    if not isinstance(projection, VeRAProjection):
        raise TypeError(f"projection must be a fastlora.vera.VeRAProjection, got {type(projection).__name__}")
    if projection.r != config.r:
        raise ValueError(
            f"the given projection has rank {projection.r} (vera_A {tuple(projection.vera_A.shape)}) but config.r={config.r}"
        )
    if projection.in_features < max_in or projection.out_features < max_out:
        raise ValueError(
            f"the given projection (vera_A {tuple(projection.vera_A.shape)}, vera_B {tuple(projection.vera_B.shape)}) "
            f"is smaller than the largest targeted layer (in_features={max_in}, out_features={max_out}); it needs "
            f"vera_A of at least [{config.r}, {max_in}] and vera_B of at least [{max_out}, {config.r}]"
        )
    return projection


def _build_linear(linear: nn.Linear, name: str, config: VeRAConfig, projection: VeRAProjection) -> VeRALinear:
    return VeRALinear.from_linear(linear, projection, r=config.r, d_initial=config.d_initial, dropout=config.dropout)


register_adapter_kind("vera", VeRAConfig, label="VeRA", prepare=_prepare_projection, one_per_model=True)
register_layer(VeRAConfig, nn.Linear, _build_linear, VeRALinear)


def apply_vera(
    model: nn.Module, config: VeRAConfig | None = None, *, projection: VeRAProjection | None = None, **overrides
) -> nn.Module:
    """Replace the targeted nn.Linear modules of ``model`` by :class:`VeRALinear`
    sharing one :class:`VeRAProjection`, in place; freeze every parameter that
    is not an adapter's (except ``modules_to_save``); return ``model``.

    The projection is generated from ``config.projection_prng_key`` sized to the
    largest targeted layer (``[r, max in_features]``, ``[max out_features, r]``),
    exactly as PEFT's ``VeraModel`` does. Pass ``projection`` to use given
    matrices instead (e.g. ``vera_A`` / ``vera_B`` from a PEFT checkpoint); it
    must have rank ``config.r`` and cover every targeted layer.
    ``overrides`` replace fields of ``config``: ``apply_vera(model, r=64)``.
    """
    config = config if config is not None else VeRAConfig()
    if not isinstance(config, VeRAConfig):
        raise TypeError(f"apply_vera: config must be a fastlora.VeRAConfig, got {type(config).__name__}")
    if overrides:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(VeRAConfig)}
        if unknown:
            raise TypeError(f"apply_vera got unknown VeRAConfig fields: {sorted(unknown)}")
        config = dataclasses.replace(config, **overrides)
    return apply_adapter(model, config, shared=projection, what="apply_vera")


def merge_vera(model: nn.Module) -> nn.Module:
    """Replace every :class:`VeRALinear` by a plain ``nn.Linear`` with the update
    merged in (in place); returns ``model`` (a bare VeRALinear becomes an nn.Linear)."""
    return merge_adapters(model, "vera")
