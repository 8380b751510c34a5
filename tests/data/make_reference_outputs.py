"""Write the reference files tests/test_model.py checks 1-class loading against.

Run once with the lunaseg of commit 2e7d298 (before 3-class models), from a checkout of that
commit: ``PYTHONPATH=<that checkout>/src python tests/data/make_reference_outputs.py
/work/shared/models/book-seg-2020-01-26.best.state``.  It saves a small 1-class U-Net the
way that lunaseg saved checkpoints, an input, and what that lunaseg's code gave for the
small model and for the book's checkpoint, so later code can show it still loads both and
gives the same output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from lunaseg.config import ModelConfig
from lunaseg.model import build_model, load_model, save_model

HERE = Path(__file__).resolve().parent


def main(book_checkpoint: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(5)
    rng = np.random.default_rng(5)
    hu = rng.integers(-1000, 600, size=(1, 7, 32, 32)).astype(np.int16)
    hu[:, :, 10:20, 12:22] = 40  # a blob, so the outputs are not all one value
    model = build_model(ModelConfig(depth=2, wf=2))
    # A few training-mode passes give the BatchNorms running statistics of HU-scaled input,
    # so the eval output is not saturated at 0 or 1.
    model.train()
    with torch.no_grad():
        for _ in range(20):
            model(torch.from_numpy(hu).float() + torch.randn(1, 7, 32, 32) * 50)
    model.eval()
    save_model(HERE / "one_class_checkpoint.pt", model, epoch=1, samples_seen=20)
    loaded, _ = load_model(HERE / "one_class_checkpoint.pt")
    book, _ = load_model(book_checkpoint)
    x = torch.from_numpy(hu).float()
    with torch.no_grad():
        np.savez_compressed(HERE / "one_class_reference.npz", hu=hu,
                            small_logits=loaded.logits(x).numpy(),
                            small_output=loaded(x).numpy(),
                            book_logits=book.logits(x).numpy(), book_output=book(x).numpy())


if __name__ == "__main__":
    main(sys.argv[1])
