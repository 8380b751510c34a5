"""The demo's time budget: calibration, the epoch share that fits, and what the demo runs."""

import pytest
import torch

from lunaseg.budget import (REFERENCE, DemoTimings, epoch_factor, estimated_s, scaled_epochs,
                            unet_training_rate)
from lunaseg.config import DataConfig, TrainConfig
from lunaseg.errors import ConfigError
from lunaseg.pipeline import DemoSettings, run_demo

REF = DemoTimings(samples_per_s=100.0, epoch_s=600.0, fixed_s=120.0, machine="test")


def test_the_full_recipe_runs_where_it_fits():
    assert epoch_factor(100.0, 720.0, REF) == 1.0  # exactly the reference: 720 s
    assert epoch_factor(400.0, 720.0, REF) == 1.0
    assert epoch_factor(10.0, 0.0, REF) == 1.0  # no budget


def test_a_slower_machine_gets_the_share_of_epochs_left_after_the_fixed_work():
    # Half as fast: fixed work 240 s, epochs 1200 s; 720 s leaves 480 s for epochs.
    assert epoch_factor(50.0, 720.0, REF) == pytest.approx(480 / 1200)
    # So slow that the fixed work alone fills the budget: no epochs beyond the minimum.
    assert epoch_factor(10.0, 720.0, REF) == 0.0


def test_scaled_epochs_round_and_keep_within_the_minimum_and_the_recipe():
    assert scaled_epochs(30, 0.5, 10) == 15
    assert scaled_epochs(30, 0.1, 10) == 10
    assert scaled_epochs(30, 1.0, 10) == 30
    assert scaled_epochs(8, 0.5, 10) == 8  # a recipe shorter than the minimum stays as it is


def test_the_estimate_follows_the_calibration():
    assert estimated_s(100.0, REF) == pytest.approx(720.0)
    assert estimated_s(50.0, REF) == pytest.approx(1440.0)


def test_without_a_budget_the_demo_runs_the_recipe_and_says_how_long_it_should_take():
    settings = DemoSettings()
    assert settings.budget_minutes == 0
    same, line = settings.fit_to_machine(REFERENCE.samples_per_s / 3)
    minutes = estimated_s(REFERENCE.samples_per_s / 3) / 60
    assert same is settings and f"about {minutes:.0f} minutes" in line


def test_a_budget_scales_every_training_stage_on_a_slow_machine_and_says_so():
    settings = DemoSettings()
    settings.budget_minutes = 12
    same, line = settings.fit_to_machine(REFERENCE.samples_per_s * 3)
    assert same is settings and "within the 12-minute budget" in line
    fitted, line = settings.fit_to_machine(REFERENCE.samples_per_s / 3)
    epochs = (fitted.train.epochs, fitted.classifier.epochs, fitted.malignancy.epochs)
    recipe = (30, 100, 30)
    assert all(r // 2 <= e < r for e, r in zip(epochs, recipe)), epochs
    assert settings.train.epochs == 30  # the original is left as it was
    assert f"{fitted.train.epochs} U-Net" in line and "weaker models" in line


def test_calibration_measures_a_rate_and_leaves_the_random_stream_alone():
    config = TrainConfig(data=DataConfig(crop_px=16), batch_size=2)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    rate = unet_training_rate(config, torch.device("cpu"), windows=2, steps=1, warmup=1)
    assert rate > 0
    assert torch.equal(torch.rand(3), expected)


def test_a_negative_budget_is_refused_before_anything_is_written(tmp_path):
    settings = DemoSettings()
    settings.budget_minutes = -1
    with pytest.raises(ConfigError, match="budget_minutes"):
        run_demo(tmp_path / "demo", settings=settings, progress=False)
    assert not (tmp_path / "demo").exists()
