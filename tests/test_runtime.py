"""Where and how torch runs: bf16 autocast only where the device has bf16 units."""

from __future__ import annotations

import torch

from lunaseg import runtime
from lunaseg.runtime import autocast, bf16_supported


def test_autocast_runs_bf16_only_where_the_cpu_has_bf16_units(monkeypatch):
    conv = torch.nn.Conv2d(1, 2, 3)
    x = torch.randn(1, 1, 8, 8)
    cpu = torch.device("cpu")
    for has_bf16 in (False, True):
        monkeypatch.setattr(runtime, "_cpu_has_bf16", lambda: has_bf16)
        assert bf16_supported(cpu) is has_bf16
        with autocast(cpu, True):
            assert conv(x).dtype == (torch.bfloat16 if has_bf16 else torch.float32)
        with autocast(cpu, False):
            assert conv(x).dtype == torch.float32


def test_the_cpu_check_answers_without_raising():
    assert isinstance(runtime._cpu_has_bf16(), bool)
    assert bf16_supported(torch.device("cuda"))  # the GPU path decides by its own flag


def test_the_models_last_layers_score_in_float32_under_bf16_autocast():
    from lunaseg.classifier import build_classifier
    from lunaseg.model import build_model
    from lunaseg.runtime import in_float32

    torch.manual_seed(0)
    classifier, unet = build_classifier().eval(), build_model().eval()
    crops = torch.randn(16, 1, 32, 48, 48) * 300
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = classifier(crops)
        pixel_logits = unet(torch.randn(2, 7, 32, 32), return_logits=True)
        layer = torch.nn.Linear(4, 1)
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16  # what autocast does alone
        assert in_float32(layer, torch.ones(1, 4)).dtype == torch.float32
    assert logits.dtype == pixel_logits.dtype == torch.float32
    # Sixteen crops, sixteen scores: bf16 logits would tie some of them.
    margin = logits[:, 1] - logits[:, 0]
    assert len(torch.unique(margin)) == 16
