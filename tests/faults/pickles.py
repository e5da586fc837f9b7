"""Issue 22, part 3: crafted pickles in five carriers, each of which would run ``touch MARKER`` when unpickled.
Shared by ``tests/faults/test_pickles.py`` and ``benchmarks/bench_faults.py``."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import torch


class Payload:
    """Unpickling this calls ``os.system("touch MARKER")``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).state_dict()


def carriers(folder: Path, marker: Path) -> dict[str, Path]:
    """Five files that each carry the payload: beside a state dict, in an optimizer's state, in a Lightning-style
    ``.ckpt``'s hyperparameters, as the ``data.pkl`` of a torch zip archive, and in a legacy (non-zip) file."""
    folder.mkdir(parents=True, exist_ok=True)
    evil = Payload(str(marker))
    out = {"state dict": folder / "state.pt", "optimizer state": folder / "optim.pt",
           "Lightning .ckpt": folder / "lightning.ckpt", "zip data.pkl": folder / "zip.pt",
           "legacy file": folder / "legacy.pt"}
    torch.save({"state_dict": _weights(), "extra": evil}, out["state dict"])
    torch.save({"model": _weights(), "optimizer": {"state": {0: {"momentum_buffer": evil}}, "param_groups": []}},
               out["optimizer state"])
    torch.save({"state_dict": {f"model.{k}": v for k, v in _weights().items()}, "epoch": 3, "global_step": 300,
                "hyper_parameters": {"lr": evil}, "pytorch-lightning_version": "2.4.0"}, out["Lightning .ckpt"])
    buf = io.BytesIO()
    torch.save(_weights(), buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(out["zip data.pkl"], "w",
                                                                             zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = pickle.dumps(evil, protocol=2) if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info, data)
    torch.save({"state_dict": _weights(), "extra": evil}, out["legacy file"], _use_new_zipfile_serialization=False)
    return out
