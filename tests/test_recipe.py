"""The training recipe's switches and the RandomForest baseline: each does what it claims."""

import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from specdeepmap.augmentation import D4, augment_pair, d4_apply, spectral_jitter, tta_d4
from specdeepmap.errors import InvalidParameterError
from specdeepmap.losses import DiceCELoss, LovaszCELoss, warmup_cosine
from specdeepmap.model_config import ModelConfig
from specdeepmap.models import ModelSpec, SpectralSegmentation, build_model, spectral_channels_for


def short_run(dataset, tmp_path, **recipe):
    """Train one epoch of two batches of 4 chips on the ``dataset`` fixture on the CPU,
    tracked in ``tmp_path``'s SQLite MLflow, nothing registered, no forest: the short run
    these tests change one switch of (``recipe`` overrides any of these settings).
    """
    from specdeepmap.training import TrainConfig, train

    settings = {
        "epochs": 1,
        "batch_size": 4,
        "limit_batches": 2,
        "device": "cpu",
        "registered_model": None,
        "baseline": False,
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
    }
    return train(
        TrainConfig(
            dataset=str(dataset / "chips"),
            out=str(tmp_path / "run"),
            **(settings | recipe),
        )
    )


def test_d4_augmentation_keeps_image_and_label_aligned():
    """Image and label get the same flip/turn: a label that encodes each pixel's own value
    stays equal to the transformed image, for every element drawn.
    """
    image = torch.arange(2 * 6 * 6, dtype=torch.float32).reshape(2, 6, 6)
    mask = image[0].long()
    seen = set()
    for _ in range(200):
        x, y = augment_pair(image, mask, "d4")
        torch.testing.assert_close(x[0].long(), y)
        torch.testing.assert_close(x[1], x[0] + 36)  # bands move together
        seen.add(tuple(x[0].flatten()[:3].tolist()))
    assert len(seen) == 8  # all eight elements of D4 occur
    x, y = augment_pair(image, mask, "none")
    assert x is image and y is mask


def test_d4_rotate_keeps_the_mask_on_the_image():
    """With a free rotation the mask is rotated like the image: where the mask is labelled
    the rotated image still carries that label's constant value.
    """
    torch.manual_seed(0)
    mask = torch.zeros(32, 32, dtype=torch.long)
    mask[8:24, 8:24] = 3
    image = (mask.float() * 10)[None].repeat(3, 1, 1)  # 30 inside the square, 0 outside
    for _ in range(20):
        x, y = augment_pair(image, mask, "d4-rotate")
        inner = y == 3
        assert inner.sum() > 150
        assert (x[0][inner] > 12).all()  # bilinear edges mix at most half with 0
        assert (x[0][y == 0] < 30).all()  # and never the square's full value outside it


def test_spectral_jitter_is_a_gain_on_the_raw_values():
    """Normalised (x = (r - mu)/sigma) then jittered equals normalising g * r; nodata stays 0."""
    rng = np.random.default_rng(0)
    raw = rng.uniform(100, 1000, (3, 4, 4))
    mean, std = np.array([300.0, 500.0, 700.0]), np.array([50.0, 80.0, 120.0])
    x = ((raw - mean[:, None, None]) / std[:, None, None]).astype(np.float32)
    valid = np.ones((4, 4), bool)
    valid[0, 0] = False
    x[:, 0, 0] = 0
    jittered = spectral_jitter(x.copy(), mean / std, valid, np.random.default_rng(1))
    again = np.random.default_rng(1)
    gain = (1 + again.uniform(-0.1, 0.1)) * again.normal(1.0, 0.02, 3)
    expected = (raw * gain[:, None, None] - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(jittered[:, valid], expected[:, valid], rtol=1e-4, atol=1e-4)
    assert (jittered[:, 0, 0] == 0).all()
    assert not np.allclose(jittered, x)


def test_tta_is_the_mean_of_the_back_transformed_predictions():
    """tta_d4 equals averaging, by hand, the eight predictions mapped back; and for an
    orientation-dependent predictor it differs from the plain prediction.
    """
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        got = tta_d4(conv, x)
        manual = torch.stack(
            [
                torch.rot90(
                    conv(torch.rot90(x.flip(-1) if f else x, k, (-2, -1))), -k, (-2, -1)
                ).flip(-1)
                if f
                else torch.rot90(conv(torch.rot90(x, k, (-2, -1))), -k, (-2, -1))
                for k, f in D4
            ]
        )
        torch.testing.assert_close(got, manual.mean(0))
        assert not torch.allclose(got, conv(x))
        # a predictor that commutes with D4 (per pixel) is unchanged by TTA
        pixelwise = torch.nn.Conv2d(3, 4, 1)
        torch.testing.assert_close(tta_d4(pixelwise, x), pixelwise(x))
    assert len(set(D4)) == 8 and d4_apply(x, 0, False) is x


def test_spectral_front_end_width_and_auto_rule():
    """The front-end turns the bands into N channels that the encoder reads (auto: 32); the
    per-pixel head sees the same features.
    """
    assert spectral_channels_for(224, -1) == 32 and spectral_channels_for(13, -1) == 32
    assert spectral_channels_for(13, 16) == 16 and spectral_channels_for(224, 0) == 0
    model = build_model(ModelSpec("unet", "resnet18", 224, 5, 32))
    assert isinstance(model, SpectralSegmentation)
    x = torch.randn(2, 224, 32, 32)
    assert model.spectral(x).shape == (2, 32, 32, 32)
    assert model.encoder.conv1.in_channels == 32
    assert model(x).shape == (2, 5, 32, 32)
    plain = build_model(ModelSpec("unet", "resnet18", 224, 5))
    assert plain.encoder.conv1.weight.numel() == 7 * model.encoder.conv1.weight.numel()
    # the per-pixel head adds logits that depend on the pixel's own spectrum only
    with torch.no_grad():
        model.eval()
        y = x.clone()
        y[:, :, 5, 5] += 3
        delta = model.pixel_head(model.spectral(y)) - model.pixel_head(model.spectral(x))
        assert delta[:, :, 5, 5].abs().sum() > 0
        delta[:, :, 5, 5] = 0
        assert delta.abs().max() == 0


def test_dice_ce_loss_rewards_overlap_and_ignores_unlabelled():
    """Perfect logits give ~0 Dice, wrong ones ~1; pixels of class 0 change nothing."""
    target = torch.randint(0, 3, (1, 16, 16), generator=torch.Generator().manual_seed(0))
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50
    loss = DiceCELoss(ignore_index=0)
    assert loss.dice(perfect, target) < 1e-2
    wrong = perfect[:, [0, 2, 1]]
    assert loss.dice(wrong, target) > 0.95
    changed = perfect.clone()
    unlabelled = target[0] == 0
    changed[0, :, unlabelled] = torch.tensor([0.0, 0.0, 50.0])[:, None]
    torch.testing.assert_close(loss(changed, target), loss(perfect, target))
    ce = torch.nn.functional.cross_entropy(wrong, target, ignore_index=0)
    torch.testing.assert_close(loss(wrong, target), ce + loss.dice(wrong, target))


def test_lovasz_ce_loss_is_one_minus_mean_iou_on_hard_predictions():
    """On saturated predictions the Lovász-softmax term equals 1 − the mean IoU over the
    classes present (the Lovász extension is exact on sets); class-0 pixels count nowhere; an
    unknown loss name is refused before training.
    """
    from specdeepmap.errors import InvalidParameterError
    from specdeepmap.training import TrainConfig

    generator = torch.Generator().manual_seed(1)
    target = torch.randint(0, 4, (2, 16, 16), generator=generator)
    predicted = target.clone()
    flip = torch.rand(target.shape, generator=generator) < 0.3
    predicted[flip] = torch.randint(1, 4, (int(flip.sum()),), generator=generator)
    logits = torch.nn.functional.one_hot(predicted, 4).permute(0, 3, 1, 2).float() * 50
    labelled = target > 0
    ious = [
        ((predicted == c) & (target == c)).sum()
        / (((predicted == c) | (target == c)) & labelled).sum()
        for c in (1, 2, 3)
    ]
    loss = LovaszCELoss(ignore_index=0)
    torch.testing.assert_close(
        loss.lovasz(logits, target), 1 - torch.stack(ious).mean(), atol=1e-4, rtol=0
    )
    assert 0.2 < float(loss.lovasz(logits, target)) < 0.9
    changed = torch.where(labelled[:, None], logits, 0.0)  # another prediction off the labels
    torch.testing.assert_close(loss(changed, target), loss(logits, target))
    with pytest.raises(InvalidParameterError, match="loss: Input should be 'dice-ce'"):
        TrainConfig(dataset="d", out="o", loss="focal")


def test_warmup_then_cosine_schedule():
    factors = [warmup_cosine(s, 10, 100, 0.01) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[-1] == pytest.approx(0.01, abs=1e-3)
    assert warmup_cosine(0, 0, 100, 0.0) == pytest.approx(1.0)


@pytest.mark.parametrize("architecture", ["unet", "segformer"])
def test_int8_quantizes_a_model_with_a_spectral_front_end(architecture):
    torch.manual_seed(0)
    model = build_model(ModelSpec(architecture, "resnet18", 40, 4, 8)).eval()
    windows = [
        np.random.default_rng(i).integers(0, 1000, (1, 40, 64, 64)).astype(np.uint16)
        for i in range(3)
    ]
    assert int8_error(model, 1000.0, windows) < 0.05


def int8_error(model: torch.nn.Module, scaler: float, windows: list[np.ndarray]) -> float:
    """Mean absolute difference of the class probabilities of ``model`` and of its int8 copy
    calibrated on ``windows`` (raw (1, C, H, W) arrays divided by ``scaler``).
    """
    from specdeepmap.inference import Predictor
    from specdeepmap.quantization import quantize_int8

    bands, height, width = windows[0].shape[1:]
    with torch.no_grad():
        outputs = model(torch.zeros(1, bands, height, width)).shape[1]
    config = ModelConfig(
        architecture="unet",
        backbone="resnet18",
        in_channels=bands,
        num_classes=outputs,
        class_values=list(range(1, outputs)),
        tile_size=[height, width],
        normalization={"scaler": scaler, "mean": None, "std": None, "nodata": None},
    )
    fp32 = Predictor(model, config, torch.device("cpu"))
    int8 = quantize_int8(fp32, windows)
    batch = np.concatenate(windows)
    return float((fp32.probabilities(batch) - int8.probabilities(batch)).abs().mean())


def test_baseline_is_logged_with_the_run_and_blocks_promotion(trained, dataset):
    """Every training run fits the RandomForest: its metrics and files are in a child run of
    the model's MLflow run; a version below it never becomes champion automatically.
    """
    import mlflow

    from specdeepmap.registry import promote_if_better

    config, result = trained
    assert result.baseline is not None
    assert 0 < result.baseline_mean_iou("validation") <= 1
    from specdeepmap.tracking import BASELINE_RUN_NAME, baseline_run_id

    client = mlflow.MlflowClient(tracking_uri=config.tracking_uri)
    # the forest's figures are in a child run: the model's run holds the model's only
    model_run = client.get_run(result.run_id)
    assert not [k for k in model_run.data.metrics if k.startswith("baseline_rf_")]
    forest_id = baseline_run_id(result.run_id, client)
    assert model_run.data.tags["baseline_run_id"] == forest_id
    forest = client.get_run(forest_id)
    assert forest.info.run_name == BASELINE_RUN_NAME
    assert forest.data.tags["mlflow.parentRunId"] == result.run_id
    metrics = forest.data.metrics
    assert metrics["baseline_rf_val_mean_iou"] == pytest.approx(
        result.baseline_mean_iou("validation")
    )
    assert metrics["baseline_rf_test_mean_iou"] == pytest.approx(result.baseline_mean_iou("test"))
    assert any(k.startswith("baseline_rf_test_iou_class_") for k in metrics)
    artifacts = [a.path for a in client.list_artifacts(forest_id, "baseline")]
    assert "baseline/test_iou.csv" in artifacts and "baseline/baseline.json" in artifacts

    mlflow.set_tracking_uri(config.tracking_uri)
    client.create_registered_model("baseline-gate")
    versions = [
        client.create_model_version("baseline-gate", source=str(dataset)).version for _ in range(3)
    ]
    assert (
        promote_if_better("baseline-gate", versions[0], 0.40, baseline_mean_iou=0.50).alias
        == "challenger"
    )
    tags = client.get_model_version("baseline-gate", versions[0]).tags
    assert tags["below_baseline"] == "true" and tags["baseline_rf_test_mean_iou"] == "0.500000"
    assert (
        promote_if_better("baseline-gate", versions[1], 0.55, baseline_mean_iou=0.50).alias
        == "champion"
    )
    assert client.get_model_version("baseline-gate", versions[1]).tags["below_baseline"] == "false"
    # better than the champion but below the baseline: still not champion
    assert (
        promote_if_better("baseline-gate", versions[2], 0.60, baseline_mean_iou=0.70).alias
        == "challenger"
    )
    assert client.get_model_version_by_alias("baseline-gate", "champion").version == versions[1]


def test_the_default_learning_rate_follows_the_batch_size(trained):
    """Without an ``lr`` the rate is 0.001 at SpecDeepMap's 2 chips per step and grows with
    the square root of the chips per step (a run's length is in chips seen, so a larger batch
    takes fewer steps): 0.002 at the default batch 8; a rate the user gives is used as it is.
    The run logs the rate it used.
    """
    import mlflow

    from specdeepmap.params import TrainParams

    assert TrainParams().batch_size == 8
    assert TrainParams().learning_rate == pytest.approx(2e-3)
    assert TrainParams(batch_size=2, accumulate_grad_batches=1).learning_rate == pytest.approx(1e-3)
    assert TrainParams(batch_size=32).learning_rate == pytest.approx(4e-3)
    assert TrainParams(batch_size=8, lr=3e-4).learning_rate == pytest.approx(3e-4)
    assert TrainParams(batch_size=2, accumulate_grad_batches=4).learning_rate == pytest.approx(2e-3)
    config, result = trained  # batch size 8, no lr
    run = mlflow.MlflowClient(tracking_uri=config.tracking_uri).get_run(result.run_id)
    assert float(run.data.params["learning_rate"]) == pytest.approx(2e-3)
    assert result.card_table()["lr"].startswith("0.002 (0.001 x sqrt(batch size / 2))")


def test_gradient_accumulation_steps_once_per_several_batches(dataset, tmp_path):
    """``accumulate_grad_batches`` sums that many batches' gradients into one optimiser step:
    the run takes that many times fewer steps, and the default rate follows the chips per
    step (here 2 x 2: 0.001 x sqrt(2)); EMA weight averaging trains along.
    """
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = short_run(
        dataset,
        tmp_path,
        batch_size=2,
        accumulate_grad_batches=2,
        weight_averaging="ema",
        limit_batches=4,
    )
    checkpoint = torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2  # 4 batches, 2 optimiser steps
    params = mlflow.MlflowClient(uri).get_run(result.run_id).data.params
    assert (params["accumulate_grad_batches"], params["weight_averaging"]) == ("2", "ema")
    assert float(params["learning_rate"]) == pytest.approx(1e-3 * 2**0.5)


@pytest.mark.parametrize(
    ("batch_size", "accumulation", "rate"),
    [(1, 8, 2e-3), (2, 4, 2e-3), (3, 3, 1e-3 * 4.5**0.5), (8, 1, 2e-3), (16, 1, 2e-3 * 2**0.5)],
)
def test_a_small_batch_accumulates_to_eight_chips_a_step_by_default(batch_size, accumulation, rate):
    """Unset, ``accumulate_grad_batches`` sums enough batches for 8 chips a step (batch 2
    alone trained below batch 8 on both real sets; accumulated, level: docs/recipe.md,
    experiment 16), and the default rate follows those chips; a count given is kept.
    """
    from specdeepmap.params import TrainParams

    params = TrainParams(batch_size=batch_size)
    assert params.accumulation == accumulation
    assert params.learning_rate == pytest.approx(rate)
    assert TrainParams(batch_size=batch_size, accumulate_grad_batches=1).accumulation == 1
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        TrainParams(accumulate_grad_batches=0)


def test_the_default_accumulation_is_what_the_run_steps_and_records(dataset, tmp_path):
    """A run at batch 2 without ``accumulate_grad_batches`` takes one optimiser step per four
    batches, and its MLflow run and model card say the accumulation and rate it used.
    """
    import mlflow

    result = short_run(dataset, tmp_path, batch_size=2, limit_batches=8)
    checkpoint = torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 2  # 8 batches, 2 optimiser steps
    params = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result.run_id)
    assert params.data.params["accumulation"] == "4"
    assert float(params.data.params["learning_rate"]) == pytest.approx(2e-3)
    table = result.card_table()
    assert table["accumulate_grad_batches"] == 4
    assert table["lr"].startswith("0.002 (0.001 x sqrt(chips per step / 2))")


def test_the_model_card_names_the_forest(trained):
    """A reviewer reads which forest the model was compared with: its trees, the bands it
    saw and how many labelled training pixels it was fitted on.
    """
    from specdeepmap.model_card import summary

    config, result = trained
    scores = result.card_scores()
    pixels = result.baseline["train_pixels"]
    assert pixels > 0
    text = scores.baseline_forest
    assert "RandomForest of 100 trees" in text
    assert f"{pixels:,}".replace(",", " ") + " labelled pixels" in text
    assert "at most 100 000" in text  # the cap
    from specdeepmap.inference import read_model_file

    model_config, _ = read_model_file(result.model_file)
    card = summary(model_config, {}, dataclasses.replace(scores, val=0.5, test=0.4))
    assert f"The RandomForest: {text}." in card


def test_baseline_command_writes_the_testers_csv(dataset, tmp_path):
    """`specdeepmap baseline` writes test_iou.csv in SpecDeepMap's format with one row per
    class, and its pooled figures match a fit done through the library.
    """
    from typer.testing import CliRunner

    from specdeepmap.baseline import dataset_normalization, run_baseline
    from specdeepmap.cli import app
    from specdeepmap.data import read_dataset_folder

    out = tmp_path / "rf"
    result = CliRunner().invoke(app, ["baseline", str(dataset / "chips"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "test_iou.csv")
    assert list(frame.columns) == ["Class", "IoU", "Name"]
    assert list(frame["Class"]) == ["1", "2", "3", "4", "5", "6", "Mean IoU"]
    assert frame["IoU"].between(0, 1).all()
    summary = json.loads((out / "baseline.json").read_text())
    info = read_dataset_folder(str(dataset / "chips"))
    again = run_baseline(info, dataset_normalization(info))
    assert summary["test"]["mean_iou"] == pytest.approx(again.mean_iou("test"))
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["mean_iou_pooled"] == pytest.approx(again.mean_iou("test"))
    assert os.path.exists(out / "confusion_matrix.png")


def test_encoder_depth_follows_the_chip_size_and_drops_unused_stages():
    """Auto depth keeps the deepest features >= 4 px; a shallower encoder holds no stage it
    never runs (every parameter gets a gradient, as DDP requires).
    """
    from specdeepmap.errors import InvalidParameterError
    from specdeepmap.models import encoder_depth_for

    assert [encoder_depth_for("unet", t, -1) for t in (32, 64, 128, 256)] == [3, 4, 5, 5]
    assert encoder_depth_for("segformer", 32, -1) == 5
    with pytest.raises(InvalidParameterError, match="only 5"):
        encoder_depth_for("deeplabv3plus", 32, 3)
    model = build_model(ModelSpec("unet", "resnet18", 13, 4, 0, 3))
    assert isinstance(model.encoder.layer3, torch.nn.Identity)
    assert not any(k.startswith("encoder.layer3") for k in model.state_dict())
    full = build_model(ModelSpec("unet", "resnet18", 13, 4))
    assert sum(p.numel() for p in full.parameters()) > 10 * sum(
        p.numel() for p in model.parameters()
    )
    model(torch.randn(2, 13, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_class_balanced_sampling_favours_chips_with_rare_classes(tmp_path):
    """A chip holding the only pixels of a rare class is drawn far more often than a chip of
    the common class; weights sum to 1.
    """
    from specdeepmap.data import ChipDataset, Normalization
    from specdeepmap.training import class_balanced_weights
    from tests.conftest import write_raster

    pairs = []
    for i in range(4):
        label = np.ones((8, 8), np.uint8)
        if i == 0:
            label[:2, :2] = 2  # the rare class: 4 pixels in one chip
        image = write_raster(tmp_path / f"i{i}.tif", np.ones((1, 8, 8), np.uint16))
        pairs.append((image, write_raster(tmp_path / f"l{i}.tif", label)))
    lookup = np.zeros(256, np.int64)
    lookup[1], lookup[2] = 1, 2
    weights = class_balanced_weights(
        ChipDataset(pairs, Normalization(), lookup, cache_dir=str(tmp_path / "cache"))
    )
    assert weights.sum().item() == pytest.approx(1.0)
    assert weights[0] > 2 * weights[1] and weights[1] == pytest.approx(weights[3].item())


def test_cutmix_pastes_a_box_of_another_chip_into_image_and_label():
    """Each chip gets one axis-aligned box from the chip before it in the batch, copied into
    the image (every band) and the label at the same place; nothing else changes.
    """
    from specdeepmap.augmentation import cutmix

    images = torch.stack([torch.full((3, 16, 16), float(i)) for i in range(3)])
    masks = torch.stack([torch.full((16, 16), i + 1) for i in range(3)])
    generator = torch.Generator().manual_seed(0)
    mixed, mixed_masks = cutmix(images, masks, 1.0, generator)
    assert torch.equal(images[:, 0], torch.arange(3.0).view(3, 1, 1).expand(3, 16, 16))
    for i in range(3):
        changed = mixed_masks[i] != i + 1
        rows, cols = changed.any(1).nonzero().ravel(), changed.any(0).nonzero().ravel()
        assert 4 <= len(rows) <= 12 and 4 <= len(cols) <= 12  # a quarter to 3/4 per side
        assert changed.sum() == len(rows) * len(cols)  # one rectangle
        assert (mixed_masks[i][changed] == (i - 1) % 3 + 1).all()
        assert (mixed[i][:, changed] == float((i - 1) % 3)).all()
        assert (mixed[i][:, ~changed] == float(i)).all()
    untouched, same = cutmix(images, masks, 0.0)
    assert torch.equal(untouched, images) and torch.equal(same, masks)


def test_band_dropout_zeroes_whole_bands_and_keeps_each_bands_expectation():
    """Band dropout zeroes a band over the whole chip (never single pixels), a share close to
    the probability, per chip, and scales the kept bands so that their mean is unchanged.
    """
    from specdeepmap.augmentation import band_dropout

    images = torch.randn(64, 50, 4, 4) + 3.0
    generator = torch.Generator().manual_seed(0)
    dropped = band_dropout(images, 0.3, generator)
    zeroed = (dropped == 0).all(dim=(2, 3))
    assert ((dropped == 0).any(dim=(2, 3)) == zeroed).all()  # whole bands only
    assert 0.25 < zeroed.float().mean() < 0.35
    assert not torch.equal(zeroed[0], zeroed[1])  # drawn per chip
    kept = ~zeroed
    assert torch.allclose(dropped[kept], images[kept] / 0.7)
    assert dropped.mean().item() == pytest.approx(images.mean().item(), rel=0.05)
    assert band_dropout(images, 0.0) is images


def test_pca_start_puts_the_spectra_main_axis_into_the_first_front_end_filter(tmp_path):
    """Chips whose spectra vary along one known direction (plus small noise): the first
    principal axis is that direction, whether a pixel is labelled or not, and the front-end's
    first filter starts on it, at the layer's initial weight scale; the other filters are left
    alone when there are fewer axes than filters.
    """
    from specdeepmap.data import ChipDataset, principal_axes
    from specdeepmap.models import ModelSpec, build_model, init_spectral_front_end
    from specdeepmap.normalization import Normalization
    from tests.conftest import write_raster

    rng = np.random.default_rng(0)
    direction = np.array([3.0, -1.0, 2.0, 0.5, 0.0, 1.0])
    direction /= np.linalg.norm(direction)
    pairs = []
    for i in range(3):
        amount = rng.normal(0, 300, (16, 16))
        image = 1000 + direction[:, None, None] * amount + rng.normal(0, 5, (6, 16, 16))
        label = np.zeros((16, 16), np.uint8)  # no labelled pixel at all
        pairs.append(
            (
                write_raster(tmp_path / f"i{i}.tif", image.astype(np.uint16)),
                write_raster(tmp_path / f"l{i}.tif", label),
            )
        )
    dataset = ChipDataset(
        pairs, Normalization(), np.zeros(256, np.int64), cache_dir=str(tmp_path / "cache")
    )
    axes = principal_axes(dataset, 8)
    assert axes.shape == (6, 6)  # no more axes than bands
    assert abs(float(axes[0] @ direction)) > 0.99
    model = build_model(ModelSpec("unet", "resnet18", 6, 3, spectral_channels=4, encoder_depth=3))
    conv = model.spectral[0]
    before = conv.weight.detach().clone()
    assert init_spectral_front_end(model, axes[:2]) == 2
    first = conv.weight[0, :, 0, 0].detach().numpy()
    assert abs(first @ direction) / np.linalg.norm(first) > 0.99
    assert torch.equal(conv.weight[2:], before[2:])
    assert float(conv.weight[:2].detach().std()) == pytest.approx(float(before.std()), rel=0.5)
    assert init_spectral_front_end(build_model(ModelSpec("unet", "resnet18", 6, 3)), axes) == 0


def test_training_starts_the_front_end_on_the_principal_axes_by_default(dataset, tmp_path):
    """The Trainer's default start (``spectral_init='pca'``) is the training chips' principal
    axes; ``random`` keeps the usual random start.
    """
    from specdeepmap.data import principal_axes
    from specdeepmap.training import TrainConfig, prepare

    cfg = TrainConfig(dataset=str(dataset / "chips"), out=str(tmp_path / "run"), device="cpu")
    prepared = prepare(cfg)
    model, train_set = prepared.model, prepared.train_set
    axes = principal_axes(train_set, 64, seed=cfg.seed)

    def cosine(net) -> float:
        first = net.spectral[0].weight[0, :, 0, 0].detach()
        return abs(
            float(torch.nn.functional.cosine_similarity(first, torch.as_tensor(axes[0]), dim=0))
        )

    assert cosine(model) > 0.999
    assert cosine(prepare(cfg.model_copy(update={"spectral_init": "random"})).model) < 0.99


def test_pseudo_labels_fill_only_unlabelled_pixels_the_forest_is_sure_of(tmp_path):
    """The forest labels a chip's unlabelled pixels (never its labelled ones) where its vote
    share reaches the threshold; the training chips then carry those labels.
    """
    from specdeepmap.baseline import fit_forest, pseudo_labels
    from specdeepmap.data import ChipDataset
    from specdeepmap.normalization import Normalization
    from specdeepmap.params import BaselineParams
    from tests.conftest import write_raster

    image = np.zeros((2, 16, 16), np.uint16)
    image[:, :, 8:] = 1000  # two spectra: left half class 1, right half class 2
    label = np.zeros((16, 16), np.uint8)
    label[:4, :4], label[:4, 12:] = 1, 2  # a few labelled pixels per class
    pair = (write_raster(tmp_path / "i.tif", image), write_raster(tmp_path / "l.tif", label))
    forest, _ = fit_forest([pair], Normalization(), [1, 2], BaselineParams(trees=10))
    pseudo = pseudo_labels(forest, [pair], Normalization(), 0.9)[0]
    assert (pseudo[label > 0] == 0).all()
    assert (pseudo[4:, :8] == 1).all() and (pseudo[4:, 8:] == 2).all()
    assert not pseudo_labels(forest, [pair], Normalization(), 1.01)[0].any()

    lookup = np.zeros(256, np.int64)
    lookup[1], lookup[2] = 1, 2
    chips = ChipDataset(
        [pair], Normalization(), lookup, cache_dir=str(tmp_path / "cache"), pseudo_labels=[pseudo]
    )
    _, mask = chips[0]
    assert (mask.numpy() == np.where(label > 0, label, pseudo)).all()


def test_per_pixel_head_loss_sees_the_heads_own_logits():
    """forward_parts returns the network's logits and the per-pixel head's share of them."""
    torch.manual_seed(0)
    model = build_model(ModelSpec("unet", "resnet18", 6, 4, 8, 3)).eval()
    x = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        logits, pixel = model.forward_parts(x)
        assert torch.allclose(logits, model(x), atol=1e-5)
        assert torch.allclose(pixel, model.pixel_head(model.spectral(x)), atol=1e-6)


def test_group_norm_replaces_every_batch_norm_and_survives_export(tmp_path):
    """norm=group leaves no BatchNorm2d; the model file rebuilds the same network."""
    from specdeepmap.inference import export_model_file, load_model

    torch.manual_seed(0)
    model = build_model(ModelSpec("unet", "resnet18", 5, 3, 8, 3, "group")).eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    config = ModelConfig(
        architecture="unet",
        backbone="resnet18",
        in_channels=5,
        num_classes=3,
        class_values=[1, 2],
        tile_size=[32, 32],
        spectral_channels=8,
        encoder_depth=3,
        norm="group",
        normalization={"scaler": None, "mean": None, "std": None, "nodata": None},
    )
    path = export_model_file(config, model, str(tmp_path / "model.pt"))
    x = torch.randn(1, 5, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_model(path, "cpu").model(x), model(x), atol=1e-5)


def test_recipe_switches_reach_the_training_run(dataset, tmp_path):
    """CutMix, band dropout, pseudo-labels, the per-pixel loss, group norm and weight decay
    train together, are recorded as the run's parameters, and AdamW is used when weight decay
    is on.
    """
    import mlflow

    from specdeepmap.lightning_task import SegmentationTask

    result = short_run(
        dataset,
        tmp_path,
        cutmix=0.5,
        pseudo_labels=0.6,
        pixel_loss_weight=0.5,
        norm="group",
        weight_decay=0.01,
        band_dropout=0.2,
        spectral_init="random",
    )
    params = (
        mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result.run_id).data.params
    )
    assert (params["cutmix"], params["pseudo_labels"], params["norm"]) == ("0.5", "0.6", "group")
    assert (params["band_dropout"], params["spectral_init"]) == ("0.2", "random")
    assert result.baseline is not None  # pseudo-labels fit the forest even without baseline
    task = SegmentationTask(
        torch.nn.Conv2d(1, 2, 1),
        ModelConfig(
            architecture="conv",
            backbone="none",
            in_channels=1,
            num_classes=2,
            class_values=[1],
            tile_size=[1, 1],
        ),
        None,
        1e-3,
        1,
        weight_decay=0.01,
    )
    task.trainer = type("T", (), {"estimated_stepping_batches": 4})()
    assert isinstance(task.configure_optimizers()["optimizer"], torch.optim.AdamW)


def test_consistency_loss_targets_confident_unlabelled_pixels_only():
    """The FixMatch term learns the network's confident classes on unlabelled pixels (seen in
    another orientation), ignores labelled and unsure pixels, and is 0 without either.
    """
    from specdeepmap.lightning_task import consistency_loss

    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 1)  # per pixel, so every D4 view gives the same logits
    x = torch.randn(2, 3, 8, 8)
    y = torch.zeros(2, 8, 8, dtype=torch.long)
    y[:, :2] = 1  # labelled rows
    with torch.no_grad():
        model.weight *= 20  # confident on most pixels
    logits = model(x)
    loss = consistency_loss(model, x, logits, y)
    probs = torch.softmax(logits.detach()[:, 1:], 1)
    confidence, target = probs.max(1)
    keep = (y == 0) & (confidence >= 0.9)
    assert 0 < keep.sum() < (y == 0).sum()
    expected = torch.nn.functional.cross_entropy(logits, target + 1, reduction="none")[keep]
    assert loss.item() == pytest.approx((expected.sum() / (y == 0).sum()).item(), rel=1e-4)
    loss.backward()
    assert model.weight.grad.abs().sum() > 0
    assert consistency_loss(model, x, logits, torch.ones_like(y)).item() == 0
    assert consistency_loss(model, x, logits * 0, y).item() == 0  # nothing confident


@pytest.mark.parametrize("architecture", ["unet", "segformer"])
def test_an_ensemble_gives_the_mean_of_its_members_probabilities(architecture):
    """An ensemble's softmax is its members' mean class probabilities, and it quantizes to
    int8 as one network does (SegFormer's decoder, which torch.fx cannot trace, stays fp32 in
    every member).
    """
    from specdeepmap.models import EnsembleSegmentation

    torch.manual_seed(0)
    depth = 3 if architecture == "unet" else 5
    members = [
        build_model(ModelSpec(architecture, "resnet18", 6, 4, 8, depth)).eval() for _ in range(3)
    ]
    ensemble = EnsembleSegmentation(members).eval()
    x = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        each = torch.stack([m(x)[:, 1:].softmax(1) for m in members])  # channel 0: unlabelled
        mean = ensemble(x)[:, 1:].softmax(1)
    assert (each[0] - each[1]).abs().max() > 1e-3  # the members differ
    torch.testing.assert_close(mean, each.mean(0), atol=1e-5, rtol=1e-4)
    windows = [
        np.random.default_rng(i).normal(0, 1, (1, 6, 64, 64)).astype(np.float32) for i in range(3)
    ]
    assert int8_error(ensemble, 1.0, windows) < 0.05


def test_training_an_ensemble_writes_one_model_of_its_members(dataset, tmp_path):
    """``ensemble=2`` trains two networks from different starts, each with its own
    checkpoints and metrics in the one MLflow run; the model file holds both, and its
    probabilities are the mean of the two best checkpoints'. Resuming an ensemble is refused
    before any work.
    """
    import mlflow

    from specdeepmap.inference import load_model, read_model_file
    from specdeepmap.training import TrainConfig, train

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = short_run(dataset, tmp_path, ensemble=2)
    config, state = read_model_file(result.model_file)
    assert config.ensemble == 2
    assert {key.split(".")[1] for key in state} == {"0", "1"}
    checkpoints = [
        read_model_file(os.path.join(tmp_path, "run", "checkpoints", *sub, name))
        for sub in ([], ["member1"])
        for name in os.listdir(os.path.join(tmp_path, "run", "checkpoints", *sub))
        if name.endswith(".ckpt")
    ]
    assert len(checkpoints) == 2
    x = np.random.default_rng(0).integers(100, 4000, (2, 13, 32, 32)).astype(np.uint16)
    members = []
    for member_config, member_state in checkpoints:
        path = tmp_path / f"m{len(members)}.pt"
        torch.save(
            {
                "format": "specdeepmap-model/1",
                "config": member_config.stored(),
                "state_dict": member_state,
            },
            path,
        )
        members.append(load_model(str(path), "cpu").probabilities(x))
    assert (members[0] - members[1]).abs().max() > 1e-3  # different random starts
    torch.testing.assert_close(
        load_model(result.model_file, "cpu").probabilities(x),
        (members[0] + members[1]) / 2,
        atol=1e-5,
        rtol=1e-4,
    )
    client = mlflow.MlflowClient(uri)
    metrics = client.get_run(result.run_id).data.metrics
    assert "val_iou" in metrics and "member1-val_iou" in metrics
    assert len(client.get_metric_history(result.run_id, "member_best_val_iou")) == 2
    assert client.get_run(result.run_id).data.params["ensemble"] == "2"
    assert len(result.member_val_ious) == 2
    assert len(result.card_table()["members' best validation IoU"].split(", ")) == 2
    with pytest.raises(InvalidParameterError, match="ensemble"):
        train(
            TrainConfig(
                dataset=str(dataset / "chips"),
                out=str(tmp_path / "again"),
                ensemble=2,
                resume=result.model_file,
            )
        )


def test_the_distillation_loss_pulls_the_student_towards_the_teacher():
    """Zero where the student's class probabilities equal the teacher's (whatever channel 0,
    'unlabelled', holds), positive elsewhere, on every pixel; a gradient step lowers it.
    """
    from specdeepmap.lightning_task import distillation_loss

    torch.manual_seed(0)
    teacher = torch.nn.Conv2d(4, 5, 1).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        same = teacher(x) + 3.0  # the same distribution: softmax ignores a constant shift
        same[:, 0] = 100.0  # channel 0 is never a class
    assert distillation_loss(teacher, x, same).item() == pytest.approx(0, abs=1e-5)
    student = torch.nn.Conv2d(4, 5, 1)
    before = distillation_loss(teacher, x, student(x))
    assert before.item() > 0.01
    before.backward()
    with torch.no_grad():
        for p in student.parameters():
            p -= 0.5 * p.grad
    assert distillation_loss(teacher, x, student(x)).item() < before.item()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is not trained


def test_distilling_an_ensemble_writes_one_network(dataset, tmp_path):
    """``distill`` with ``ensemble=2``: the members train, then one more network learns from
    their mean; the model file is that single network (no ensemble in its config), its
    checkpoint and metrics are in the run beside the ensemble's validation IoU. Without an
    ensemble the switch is refused before any work.
    """
    import mlflow

    from specdeepmap.inference import read_model_file
    from specdeepmap.training import TrainConfig

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = short_run(dataset, tmp_path, ensemble=2, distill=True)
    config, state = read_model_file(result.model_file)
    assert config.ensemble == 1
    assert not any(key.startswith("members.") for key in state)
    assert "student" in result.best_checkpoint
    _, student = read_model_file(result.best_checkpoint)
    assert all(torch.equal(state[k], student[k]) for k in state)
    teacher_config, _ = read_model_file(str(tmp_path / "run" / "ensemble.pt"))
    assert teacher_config.ensemble == 2  # the teacher, kept beside for comparison
    metrics = mlflow.MlflowClient(uri).get_run(result.run_id).data.metrics
    assert {"student-val_iou", "ensemble_val_iou", "member1-val_iou"} <= set(metrics)
    assert result.best_val_iou == pytest.approx(metrics["best_val_iou"])
    assert result.distilled_from_val_iou is not None
    assert "validation IoU of the ensemble distilled" in result.card_table()
    with pytest.raises(InvalidParameterError, match="distill"):
        TrainConfig(dataset=str(dataset / "chips"), out=str(tmp_path / "x"), distill=True)


@pytest.mark.parametrize(
    ("batch_size", "accumulate", "chips", "batches"),
    [(2, 1, 256, 128), (8, 1, 256, 32), (16, 1, 256, 16), (32, 1, 512, 16), (8, 4, 512, 64)]
    + [(2, None, 256, 128)],  # the default: four batches of 2 a step, 32 steps an epoch
)
def test_a_small_set_gets_its_optimiser_steps_at_any_batch_size(
    batch_size, accumulate, chips, batches
):
    """Ten training chips are drawn until an epoch holds 256 chips and 16 optimiser steps:
    batch 2 to 16 get the chips' floor, a larger batch (or accumulated batches) the steps'
    floor, so that batch 32 takes as many steps as batch 16 rather than half.
    """
    from specdeepmap.training import TrainConfig
    from specdeepmap.training.data_module import ChipDataModule

    cfg = TrainConfig(
        dataset="chips",
        out="run",
        batch_size=batch_size,
        accumulate_grad_batches=accumulate,
    )
    data = ChipDataModule(cfg, list(range(10)), [], pin_memory=False)
    assert data.samples == chips
    assert data.batches_per_epoch(None) == batches
    assert data.batches_per_epoch(None) // cfg.accumulation >= cfg.min_steps_per_epoch
    no_floor = ChipDataModule(
        cfg.model_copy(update={"min_steps_per_epoch": 0}), list(range(10)), [], False
    )
    assert no_floor.samples == 256
    # under DDP each device takes its steps from its share of the epoch's chips
    ddp = ChipDataModule(cfg.model_copy(update={"devices": 2}), list(range(10)), [], False)
    assert ddp.samples == max(256, 2 * cfg.min_steps_per_epoch * cfg.chips_per_step)
