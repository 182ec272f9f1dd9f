"""The GPU block end in eager mode: the fewest kernels, with autograd's own backward.

On a GPU a block end's passes over memory are cheap and its cost is kernel
launches and the host time between them, so it runs as few operators as the
formulation allows; a Python ``autograd.Function`` would cost more host time
than it saves.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def gate_of(y: torch.Tensor, eca: nn.Module) -> torch.Tensor:
    """ECA's gate ``[B, C, 1, 1]``: mean, Conv1d across channels, sigmoid."""
    weight = eca.conv.weight
    logits = F.conv1d(y.mean((2, 3)).unsqueeze(1), weight, padding=(weight.shape[-1] - 1) // 2)
    return torch.sigmoid(logits).squeeze(1)[..., None, None]


def block_end(x: torch.Tensor, norm: nn.Module, eca: nn.Module, shortcut: Optional[torch.Tensor],
              relu: bool) -> torch.Tensor:
    """``relu?(eca(norm(x)) (+ shortcut))``: gate and residual in one ``addcmul``."""
    y = norm(x)
    gate = gate_of(y, eca)
    out = y * gate if shortcut is None else torch.addcmul(shortcut, y, gate)
    return out.relu_() if relu else out


def inference_block_end(x: torch.Tensor, norm: nn.Module, eca: nn.Module, shortcut: Optional[torch.Tensor],
                        relu: bool) -> torch.Tensor:
    """As :func:`block_end`, written over BatchNorm's output, which nothing reads again without autograd."""
    y = norm(x)
    gate = gate_of(y, eca)
    out = y.mul_(gate) if shortcut is None else torch.addcmul(shortcut, y, gate, out=y)
    return out.relu_() if relu else out
