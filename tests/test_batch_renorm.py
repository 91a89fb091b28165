"""Batch renormalisation: plain batch norm at closed clips, inference's arithmetic when
open, and a training run whose model file holds plain batch norms.
"""

import pytest
import torch
from torch import nn

from specdeepmap.batch_renorm import (
    D_MAX,
    R_MAX,
    BatchRenorm2d,
    clips,
    to_batch_norm,
    to_batch_renorm,
)
from specdeepmap.models import ModelSpec, build_model

from .test_recipe import short_run


def _pair(channels: int = 4) -> tuple[nn.BatchNorm2d, nn.Module]:
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(channels)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 2.0)
        plain.bias.uniform_(-1.0, 1.0)
        plain.running_mean.uniform_(-0.5, 0.5)
        plain.running_var.uniform_(0.5, 2.0)
    holder = nn.Sequential(plain)
    return plain, holder


def test_closed_clips_train_as_batch_norm_does():
    """r_max 1, d_max 0: the same output and gradients as BatchNorm2d in training."""
    plain, holder = _pair()
    reference = nn.BatchNorm2d(4)
    reference.load_state_dict(plain.state_dict())
    to_batch_renorm(holder)
    renorm = holder[0]
    assert isinstance(renorm, BatchRenorm2d) and (renorm.r_max, renorm.d_max) == (1.0, 0.0)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, expected = renorm(x), reference(x_ref)
    assert torch.allclose(out, expected, atol=1e-5)
    out.pow(2).sum().backward()
    expected.pow(2).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-4)
    assert torch.allclose(renorm.weight.grad, reference.weight.grad, atol=1e-4)


def test_open_clips_train_on_what_inference_computes():
    """Within the clips, training's output is the running statistics' (inference's) output,
    whatever the batch's own mean and spread; the running statistics then move towards the
    batch's at the renormalising rate.
    """
    plain, holder = _pair()
    to_batch_renorm(holder)
    renorm = holder[0]
    renorm.r_max, renorm.d_max = R_MAX, D_MAX
    x = torch.randn(2, 4, 8, 8) * 1.3 + 0.2
    with torch.no_grad():
        inference = renorm.eval()(x)
        before = renorm.running_mean.clone()
        training = renorm.train()(x)
    assert torch.allclose(training, inference, atol=1e-5)
    batch_mean = x.mean(dim=(0, 2, 3))
    assert torch.allclose(
        renorm.running_mean, before + renorm.momentum * (batch_mean - before), atol=1e-6
    )


def test_swap_keeps_the_tensors_and_swaps_back():
    """The swap holds the same parameter objects (an optimiser keeps working) and the same
    state-dict keys, and undoing it restores plain batch norms with their own momentum.
    """
    model = build_model(ModelSpec("unet", "resnet18", 5, 3, 8, 3))
    keys = list(model.state_dict())
    ids = [id(p) for p in model.parameters()]
    count = sum(type(m) is nn.BatchNorm2d for m in model.modules())
    assert to_batch_renorm(model) == count > 0
    assert [id(p) for p in model.parameters()] == ids
    assert list(model.state_dict()) == keys
    to_batch_norm(model)
    assert sum(type(m) is nn.BatchNorm2d for m in model.modules()) == count
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert not any(isinstance(m, BatchRenorm2d) for m in model.modules())


@pytest.mark.parametrize(
    "progress, expected", [(0.0, (1.0, 0.0)), (0.05, (1.0, 0.0)), (0.3, (3.0, 5.0))]
)
def test_clips_open_after_the_warm_up(progress, expected):
    assert clips(progress, start=0.05) == pytest.approx(expected)
    r_max, d_max = clips(0.05 + 0.125, start=0.05)
    assert (r_max, d_max) == pytest.approx((2.0, 2.5))


def test_renorm_run_saves_plain_batch_norms(dataset, tmp_path):
    """Renormalisation (the default at batch 2) trains, records the choice resolved, and
    its model file rebuilds a network of plain batch norms holding the trained statistics.
    """
    import mlflow

    from specdeepmap.inference import load_model

    result = short_run(dataset, tmp_path, batch_size=2, epochs=2)  # renorm: the default
    params = (
        mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result.run_id).data.params
    )
    assert (params["norm"], params["norm_layers"]) == ("None", "renorm")
    assert result.recipe["norm"] == "renorm"
    loaded = load_model(result.model_file, "cpu")
    assert loaded.config.norm == "batch"
    norms = [m for m in loaded.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(type(m) is nn.BatchNorm2d for m in norms)
    assert any(int(m.num_batches_tracked) > 0 for m in norms)


def test_renorm_is_a_training_callback_opening_after_the_warm_up(tmp_path):
    """norm=renorm adds the callback, whose clips open after the learning rate's warm-up;
    other norms do not.
    """
    from specdeepmap.batch_renorm import BatchRenormalization
    from specdeepmap.training import TrainConfig
    from specdeepmap.training.fit import training_callbacks

    def renorms(**settings):
        cfg = TrainConfig(dataset=str(tmp_path), out=str(tmp_path / "run"), **settings)
        found = training_callbacks(cfg, None)
        return [c for c in found if isinstance(c, BatchRenormalization)]

    [callback] = renorms(norm="renorm", epochs=20, warmup_epochs=1, early_stopping=False)
    assert callback.start == pytest.approx(0.05)
    assert renorms(norm="batch", batch_size=2, early_stopping=False) == []
    assert len(renorms(batch_size=8, early_stopping=False)) == 1  # the default below 16
    assert renorms(batch_size=16, early_stopping=False) == []


@pytest.mark.parametrize(
    "batch_size, norm, expected",
    [(2, None, "renorm"), (8, None, "renorm"), (15, None, "renorm"), (16, None, "batch")]
    + [(2, "batch", "batch"), (16, "renorm", "renorm"), (2, "group", "group")],
)
def test_default_norm_follows_the_batch_size(batch_size, norm, expected):
    """Unset, renormalisation below 16 chips a batch and batch norm from 16 up; a norm given
    is used as it is.
    """
    from specdeepmap.params import TrainParams

    assert TrainParams(batch_size=batch_size, norm=norm).norm_layers == expected
