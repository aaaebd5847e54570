"""Dropout for CPU training whose mask costs a third of torch's.

torch's CPU dropout draws one random float per element (`bernoulli_`, about 5 ns each on a 2.6
GHz core): a millisecond for a 16 x 28 x 384 activation, and 10-15% of a MiniLM LoRA training
step, whose twenty dropouts run on tensors that small. Here each 64-bit draw of torch's
generator gives four 16-bit lanes, and an element is kept when its lane clears a threshold:

    keep = lane >= round(p * 65536)   (lanes uniform on 0..65535; scaled by 1 / (1 - p))

Limits, plainly:
- p is rounded to a multiple of 1/65536 (0.1 drops with probability 0.100006);
- the masks differ from F.dropout's for the same seed (same generator, other draws), so a run
  is reproducible under `torch.manual_seed` but not mask-for-mask comparable with torch's;
- off the CPU (where torch's dropout is a fused kernel) it is F.dropout itself.

Like F.dropout, the mask is kept as one byte per element for backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LANES = 65536  # values of a 16-bit lane
_LANE_MIN = -32768  # lanes are read as int16


class _KeepAndScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep.to(x.dtype).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad * keep.to(grad.dtype).mul_(ctx.scale), None, None


def keep_mask(shape: torch.Size, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool tensor of `shape`, each element True with probability 1 - p (p rounded to
    1/65536), drawn from torch's default generator of `device`."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    lanes = words.view(torch.int16)[:n].view(shape)
    return lanes >= round(p * LANES) + _LANE_MIN


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training), with the cheaper mask on CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    return _KeepAndScale.apply(x, keep_mask(x.shape, p, x.device), 1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """nn.Dropout with `dropout`'s cheaper CPU mask (same p, same train/eval behaviour)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:  # the fast path makes a new tensor; keep torch's in-place semantics
            return super().forward(x)
        return dropout(x, self.p, self.training)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every plain nn.Dropout in `model` for `Dropout` (in place, same p and mode);
    returns how many. Functional dropout inside a model's code (attention probabilities in
    transformers' sdpa attention functions) is not reached."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                replacement = Dropout(child.p, child.inplace)
                replacement.train(child.training)
                setattr(module, name, replacement)
                swapped += 1
    return swapped
