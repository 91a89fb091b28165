"""Batch renormalisation (Ioffe 2017) for training with small batches.

Batch norm normalises a layer by the mean and spread of the current batch in training and by
running averages at inference. With two chips a batch, the batch's statistics are a noisy
guess at the running ones (at the deepest stage of a 64 px chip: 2 x 4 x 4 values per
channel), so the network learns on other activations than it maps with. Batch
renormalisation normalises by the batch and then corrects towards the running statistics,
``(x - mean_B) / std_B * r + d`` with ``r = std_B / std`` and ``d = (mean_B - mean) / std``
held constant in the gradient and clipped to ``[1/r_max, r_max]`` and ``[-d_max, d_max]``:
unclipped, training sees what inference computes.

Training only: the modules are swapped in when a fit starts and back to plain
``BatchNorm2d`` when it ends, holding the same parameter and buffer tensors, so checkpoints,
ONNX export, batch-norm folding and every reader of a model file are unchanged.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from specdeepmap.models import replace_submodule

#: the correction's final clips (Ioffe 2017's values)
R_MAX, D_MAX = 3.0, 5.0
#: share of the training steps over which the clips open from plain batch norm (r 1, d 0)
#: to :data:`R_MAX` and :data:`D_MAX`, after the learning rate's warm-up (Ioffe trains with
#: batch norm alone first, then relaxes the bounds over about a quarter of training)
RAMP = 0.25
#: update rate of the running statistics while renormalising: they are what the correction
#: aims at, so they average about a hundred small batches instead of torch's ten (0.1)
RUNNING_MOMENTUM = 0.01


class BatchRenorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` that, in training, corrects the batch's statistics towards the
    running ones within the clips ``r_max`` and ``d_max`` (1 and 0: plain batch norm).
    At inference (``eval()``) it is ``BatchNorm2d``.
    """

    r_max: float = 1.0
    d_max: float = 0.0
    #: the momentum of the batch norm this module stands in for (restored by
    #: :func:`to_batch_norm`)
    batch_norm_momentum: float | None = 0.1

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or (self.r_max == 1.0 and self.d_max == 0.0):
            return super().forward(x)  # inference, or closed clips: plain batch norm
        # gamma * ((x - mean_B) / std_B * r + d) + beta is batch norm over the batch with
        # weight gamma * r and bias beta + gamma * d (r, d constants): torch's fused kernel
        # then computes the rest and its gradient, and updates the running statistics
        with torch.no_grad():
            # the batch's mean and (biased) variance by batch norm's own kernel: on CPU about
            # ten times faster than torch.var_mean over (0, 2, 3), channels-last or not
            mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
            running_std = (self.running_var + self.eps).sqrt()
            r = ((var + self.eps).sqrt() / running_std).clamp(1 / self.r_max, self.r_max)
            d = ((mean - self.running_mean) / running_std).clamp(-self.d_max, self.d_max)
        weight, bias = (self.weight, self.bias) if self.affine else (1.0, 0.0)
        self.num_batches_tracked += 1
        return nn.functional.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            weight * r.to(x.dtype),
            bias + weight * d.to(x.dtype),
            training=True,
            momentum=self.momentum,
            eps=self.eps,
        )


def _moved(source: nn.BatchNorm2d, target: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """``target`` holding ``source``'s parameter and buffer tensors (the same objects, so an
    optimiser built on them keeps working).
    """
    if source.affine:
        target.weight, target.bias = source.weight, source.bias
    target.running_mean, target.running_var = source.running_mean, source.running_var
    target.num_batches_tracked = source.num_batches_tracked
    return target.train(source.training)


def to_batch_renorm(model: nn.Module) -> int:
    """Swap every ``BatchNorm2d`` that keeps running statistics for a :class:`BatchRenorm2d`
    on the same tensors; the number swapped.
    """
    swapped = 0
    for name, module in list(model.named_modules()):
        if type(module) is nn.BatchNorm2d and module.track_running_stats:
            renorm = BatchRenorm2d(
                module.num_features, module.eps, RUNNING_MOMENTUM, module.affine, device="meta"
            )
            renorm.batch_norm_momentum = module.momentum
            replace_submodule(model, name, _moved(module, renorm))
            swapped += 1
    return swapped


def to_batch_norm(model: nn.Module) -> None:
    """Undo :func:`to_batch_renorm`: plain ``BatchNorm2d`` with its own momentum again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BatchRenorm2d):
            plain = nn.BatchNorm2d(
                module.num_features,
                module.eps,
                module.batch_norm_momentum,
                module.affine,
                device="meta",
            )
            replace_submodule(model, name, _moved(module, plain))


def set_clips(model: nn.Module, r_max: float, d_max: float) -> None:
    """Set the clips of every :class:`BatchRenorm2d` of ``model``."""
    for module in model.modules():
        if isinstance(module, BatchRenorm2d):
            module.r_max, module.d_max = r_max, d_max


def clips(progress: float, start: float) -> tuple[float, float]:
    """``(r_max, d_max)`` at ``progress`` (share of training steps done): plain batch norm
    until ``start``, then opening linearly over :data:`RAMP` to :data:`R_MAX`, :data:`D_MAX`.
    """
    opened = min(1.0, max(0.0, (progress - start) / RAMP))
    return 1.0 + (R_MAX - 1.0) * opened, D_MAX * opened


class BatchRenormalization(L.Callback):
    """Train the task's network with :class:`BatchRenorm2d` in place of its batch norms,
    opening the clips after ``start`` (a share of the training steps: the warm-up's).
    """

    def __init__(self, start: float):
        self.start = start

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        to_batch_renorm(pl_module.model)

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        progress = trainer.global_step / max(1, trainer.estimated_stepping_batches)
        set_clips(pl_module.model, *clips(progress, self.start))

    @override
    def on_fit_end(self, trainer, pl_module) -> None:
        to_batch_norm(pl_module.model)
