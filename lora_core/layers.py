"""LoRA wrapper layers for nn.Linear, GPT-2's Conv1D and nn.Embedding.

The math, once:

    h = W x + (alpha / r) * B A dropout(x)

W (the wrapped `base_layer`) is frozen; only A (r x in) and B (out x r) train. With B = 0 at
init the wrapped layer starts out identical to the base layer. `merge` folds the update into W
(W += scaling * B @ A) so inference costs nothing extra; `unmerge` subtracts it again.

Attribute names follow PEFT (`base_layer`, `lora_A`, `lora_B`, `lora_embedding_A`,
`lora_embedding_B`), minus PEFT's per-adapter ModuleDicts, so `state_dict()` keys are exactly the
keys PEFT writes to disk (e.g. `...query.lora_A.weight`). This module imports only torch;
Conv1D is recognised by class name so transformers stays optional.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import Dropout


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style Conv1D (a Linear whose weight is stored [in, out])."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.ndim == 2
    )


def is_supported(module: nn.Module) -> bool:
    """Whether `module` is a layer type lora_core can wrap."""
    return isinstance(module, (nn.Linear, nn.Embedding)) or is_conv1d(module)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a supported layer; for an Embedding: (num_embeddings, embedding_dim)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if is_conv1d(module):
        fan_in, fan_out = module.weight.shape
        return fan_in, fan_out
    raise TypeError(f"{type(module).__name__} cannot take LoRA")


def _lora_dtype(weight: torch.Tensor) -> torch.dtype:
    return weight.dtype if weight.dtype.is_floating_point else torch.float32


class LoraLayer(nn.Module):
    """Shared state of every wrapper: frozen `base_layer`, rank, scaling, and merge bookkeeping.

    `merged` means the update currently lives inside base_layer.weight; `disabled` makes the
    wrapper behave like the plain base layer (while unmerged).
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, use_rslora: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False
        self.disabled = False
        self.in_features, self.out_features = in_out_features(base_layer)
        base_layer.weight.requires_grad_(False)

    # HF code sometimes reads `.weight` / `.bias` of a known layer (weight tying, dtype checks).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def lora_parameter_names(self) -> tuple[str, str]:
        """The state_dict keys (relative to this layer) that make up the adapter."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, laid out like base_layer.weight (fp32 maths for half types on CPU)."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        """A new tensor W + delta in W's dtype; W itself is not touched."""
        weight = self.base_layer.weight
        return weight.detach() + self.delta_weight().to(weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (no-op when already merged)."""
        if not self.merged:
            weight = self.base_layer.weight
            weight += self.delta_weight().to(weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight (no-op when not merged)."""
        if self.merged:
            weight = self.base_layer.weight
            weight -= self.delta_weight().to(weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, merged={self.merged}"


def _fp32_on_cpu(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """CPU half-precision matmuls are slow and lossy: merge maths runs in fp32 there (as PEFT)."""
    if tensors[0].device.type == "cpu" and tensors[0].dtype in (torch.float16, torch.bfloat16):
        return [t.float() for t in tensors]
    return list(tensors)


class LoraLinear(LoraLayer):
    """LoRA for nn.Linear and Conv1D: h = W x + (alpha/r) * B A dropout(x).

    For Conv1D (`fan_in_fan_out=True`) the base weight is [in, out], so the delta is transposed
    before merging; the LoRA branch itself is the same pair of bias-free Linears either way.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        *,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "default",
    ) -> None:
        super().__init__(base_layer, r, alpha, use_rslora)
        self.fan_in_fan_out = is_conv1d(base_layer)
        weight = base_layer.weight
        kw = {"device": weight.device, "dtype": _lora_dtype(weight)}
        self.lora_dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **kw)
        self.reset_lora_parameters(init)

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default") -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:  # like nn.Linear's own init, and PEFT's default
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def lora_parameter_names(self) -> tuple[str, str]:
        return "lora_A.weight", "lora_B.weight"

    def _frozen_linear(self) -> bool:
        """A plain frozen nn.Linear on CPU without hooks of its own (they would not run)."""
        base = self.base_layer
        return (
            type(base) is nn.Linear
            and not base.weight.requires_grad
            and base.weight.device.type == "cpu"
            and not (base._forward_hooks or base._forward_pre_hooks)
        )

    def _autocast_weight(self, device_type: str) -> torch.Tensor:
        """The frozen base weight in autocast's dtype, cast once and kept until the weight
        changes (a merge, a load). Autocast caches only weights that require grad, so a frozen
        weight would be cast again on every forward; the fp32 weight stays the master copy."""
        weight = self.base_layer.weight
        dtype = torch.get_autocast_dtype(device_type)
        key = (weight.data_ptr(), weight._version, dtype)
        cached = self.__dict__.get("_cast_weight")
        if cached is None or cached[0] != key:
            cached = (key, weight.detach().to(dtype))
            self.__dict__["_cast_weight"] = cached  # not a buffer: state_dict stays the adapter's
        return cached[1]

    def delta_weight(self) -> torch.Tensor:
        a, b = _fp32_on_cpu(self.lora_A.weight, self.lora_B.weight)
        delta = (b @ a) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        autocast = torch.is_autocast_enabled(x.device.type)
        if autocast and not args and not kwargs and self._frozen_linear():
            weight = self._autocast_weight(x.device.type)
            if x.dtype == torch.float32:  # cast once for both branches, not once for each
                x = x.to(weight.dtype)
            result = F.linear(x, weight, self.base_layer.bias)
        else:
            result = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
            return result
        lora_A = self.lora_A
        if x.dtype != lora_A.weight.dtype and not autocast:  # autocast casts for the matmul
            x = x.to(lora_A.weight.dtype)
        # Scale the rank-r activations, not the output: a (tokens x r) multiply instead of a
        # (tokens x out_features) one, forward and backward (PEFT scales the output).
        update = self.lora_B(lora_A(self.lora_dropout(x)) * self.scaling)
        if update.dtype != result.dtype:
            update = update.to(result.dtype)
        return result + update


class LoraEmbedding(LoraLayer):
    """LoRA for nn.Embedding: h = W[x] + (alpha/r) * (A^T[x]) B^T.

    A is [r, num_embeddings] (a lookup table of r-dim codes), B is [embedding_dim, r]. As in PEFT,
    A starts at zero and B is normal, and there is no dropout (the input is token ids).
    """

    def __init__(
        self,
        base_layer: nn.Embedding,
        r: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        **_: object,
    ) -> None:
        super().__init__(base_layer, r, alpha, use_rslora)
        weight = base_layer.weight
        kw = {"device": weight.device, "dtype": _lora_dtype(weight)}
        self.lora_embedding_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.out_features, r, **kw))
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default") -> None:
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def lora_parameter_names(self) -> tuple[str, str]:
        return "lora_embedding_A", "lora_embedding_B"

    def delta_weight(self) -> torch.Tensor:
        a, b = _fp32_on_cpu(self.lora_embedding_A, self.lora_embedding_B)
        return (b @ a).T * self.scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
            return result
        base = self.base_layer
        after_A = F.embedding(
            x,
            self.lora_embedding_A.T,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        update = (after_A @ self.lora_embedding_B.T) * self.scaling
        if update.dtype != result.dtype:
            update = update.to(result.dtype)
        return result + update


def wrap(
    module: nn.Module, *, r: int, alpha: float, dropout: float, use_rslora: bool, init: str
) -> LoraLayer:
    """Build the right wrapper for a supported layer."""
    cls = LoraEmbedding if isinstance(module, nn.Embedding) else LoraLinear
    return cls(module, r, alpha, dropout=dropout, use_rslora=use_rslora, init=init)


def looks_like_lora(module: nn.Module) -> bool:
    """Our wrappers, or a PEFT tuner layer (which also owns a base_layer plus lora_* members)."""
    return isinstance(module, LoraLayer) or (
        hasattr(module, "base_layer") and hasattr(module, "lora_A")
    )


__all__ = [
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "in_out_features",
    "is_conv1d",
    "is_supported",
    "wrap",
]
