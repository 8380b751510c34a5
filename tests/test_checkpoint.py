"""Checkpoint files: atomic, plain data only, refusing anything that is not one."""

from __future__ import annotations

import os
import pickle
import random
import re
import shlex
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lunaseg.checkpoint import load_checkpoint, save_checkpoint
from lunaseg.errors import CheckpointError
from lunaseg.model import build_model
from lunaseg.runtime import capture_rng_state, restore_rng_state


def _save(path: Path, model: torch.nn.Module | None = None, **fields) -> str:
    fields = {"config": None, "epoch": 0, "samples_seen": 0, **fields}
    return save_checkpoint(path, model=model or build_model(), model_kind="segmentation",
                           model_config=None, spec=None, **fields)


def test_rng_state_round_trip(tmp_path):
    path = tmp_path / "rng.pt"
    torch.manual_seed(5)
    model = build_model()
    _save(path, model, rng_state=capture_rng_state())
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(path).rng_state)
    got = (torch.rand(3), random.random(), np.random.rand())
    torch.testing.assert_close(got[0], expected[0])
    assert got[1:] == expected[1:]


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    _save(path, epoch=1, samples_seen=1)
    before = path.read_bytes()

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _save(path, epoch=2, samples_seen=2)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.pt"]


def test_unsupported_config_value_fails_at_save(tmp_path):
    with pytest.raises(TypeError, match=r"config\['fn'\]"):
        _save(tmp_path / "m.pt", config={"fn": print})


class _Evil:
    """Pickles to a call of os.system that would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("container", ["pickle", "torch-zip", "torch-legacy"])
def test_malicious_pickle_is_refused_without_running(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"model_state": build_model().state_dict(), "hook": _Evil(marker)}
    if container == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=container == "torch-zip")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"evil\.pt.*refused") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_the_evil_payload_is_live(tmp_path):
    """Guards the test above: an unrestricted unpickler really would run the command."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Evil(marker)))
    assert marker.exists()


def _zip_of_text(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")


@pytest.mark.parametrize("name,make,problem", [
    ("random.pt", lambda p: p.write_bytes(random.Random(0).randbytes(4096)), "not a checkpoint"),
    ("random2.pt", lambda p: p.write_bytes(random.Random(1).randbytes(64)), "not a checkpoint"),
    ("empty.pt", lambda p: p.write_bytes(b""), "not a checkpoint"),
    ("notes.txt", lambda p: p.write_text("epoch 3, recall 0.8\n"), "not a checkpoint"),
    ("other.zip", _zip_of_text, "not a checkpoint"),
    ("list.pt", lambda p: torch.save([torch.zeros(2)], p), "holds a list"),
    ("nostate.pt", lambda p: torch.save({"epoch": 1}, p), "no 'model_state'"),
    ("bare.pt", lambda p: torch.save(build_model().state_dict(), p), "bare state_dict"),
    ("junkstate.pt", lambda p: torch.save({"model_state": {"a": 1}}, p), "not named tensors"),
])
def test_non_checkpoints_raise_checkpoint_error(tmp_path, name, make, problem):
    path = tmp_path / name
    make(path)
    with pytest.raises(CheckpointError, match=re.escape(problem)) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert name in message and "\n" not in message


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path)




def test_saved_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        _save(tmp_path / "m.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "m.pt").stat().st_mode & 0o777 == 0o644
