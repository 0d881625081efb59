"""Batch-norm statistics that match the weights being evaluated.

The evaluated head is an EMA of the trained one, and its pretrained CNN starts from ImageNet
running statistics. The EMA copies the live model's running statistics, which were gathered
under other weights, and with a small BN momentum they can still be half ImageNet's after a
short fine-tuning. Then train-mode and eval-mode outputs differ and the decision threshold moves:
on BreastMNIST a saved D-Cube head scored test ACC 0.66 with its stored statistics and 0.83 once
they were recomputed (AUC 0.81 -> 0.85).

:func:`recalibrate_bn` recomputes them for the module's current weights on training images,
like ``torch.optim.swa_utils.update_bn``, which cannot be used directly because the head takes
two inputs (feature maps and images).
"""

from __future__ import annotations

import torch
from torch import nn


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(module: nn.Module, batches) -> int:
    """Reset every batch norm's running statistics and re-estimate them as the plain average over
    `batches` (an iterable of argument tuples for ``module(*args)``); returns the number of
    batch-norm layers recomputed. Those the module keeps in eval mode in training (a frozen part)
    are left as they are. The module is left in eval mode with its momenta unchanged."""
    module.train()
    bns = [m for m in batch_norms(module) if m.training]  # frozen parts stay in eval mode, statistics kept
    if not bns:
        module.eval()
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    for args in batches:
        module(*args)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    module.eval()
    return len(bns)
