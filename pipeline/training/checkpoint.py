"""Complete training state for exact resume (torchvision references style).

A checkpoint is one `state.pt` file holding: model, optimizer, LR schedule position (epoch and
stage; the schedule itself is a pure function of them), grad scaler, RNG states of torch /
numpy / python, the config hash, the recipe (`Config.recipe`: every setting but where and
how the run executes, which a resume must match) and, when the driver knows it, the data
(`pipeline.data.manifest.data_identity`, whose manifest hash a resume must match too).
Loading uses `weights_only=True`: everything stored is a tensor or a plain Python container,
so no pickled code is ever executed.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import Config
from pipeline.data.manifest import data_refusal, same_data
from pipeline.models import build_model
from pipeline.storage import display, read_bytes, resolve

CHECKPOINT_FILE = "state.pt"
FORMAT_VERSION = 2  # 2: resume checks the stored recipe settings, not the config hash


class CheckpointError(RuntimeError):
    pass


def capture_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` to directory/state.pt atomically (temp file + rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    tmp = path.with_suffix(".tmp")
    torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(
    directory: str | os.PathLike,
    expected_recipe: dict[str, Any] | None = None,
    expected_data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint weights-only; refuse one trained under another recipe, naming the
    settings that differ (execution settings such as device or AMP may differ), or on other
    data than `expected_data`, naming both (a checkpoint without a data record, written before
    checkpoints had one, is not checked)."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / not a torch file / unsafe content
        raise CheckpointError(f"cannot load checkpoint {path}: {exc}") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has unknown format {state.get('format_version')}")
    if expected_recipe is not None:
        saved, unset = state.get("recipe", {}), "<unset>"
        differ = []
        for key in sorted(saved.keys() | expected_recipe.keys()):
            there, here = saved.get(key, unset), expected_recipe.get(key, unset)
            if there != here:
                differ.append(f"{key}={there!r} there, {here!r} here")
        if differ:
            raise CheckpointError(
                f"checkpoint {path} was trained under another recipe ({'; '.join(differ)}): "
                "refusing to resume it"
            )
    recorded = state.get("data")
    if expected_data is not None and recorded and not same_data(recorded, expected_data):
        raise CheckpointError(
            data_refusal(f"checkpoint {path} was trained on", recorded, expected_data)
        )
    return state


def load_pretrained_weights(uri: str) -> dict[str, torch.Tensor]:
    """A state dict the user brings (`model.pretrained`: a local path or s3://), loaded
    weights-only: the file is never executed, only its tensors are read."""
    fs, path = resolve(uri)
    try:
        blob = read_bytes(fs, path)
    except FileNotFoundError:
        raise CheckpointError(f"model.pretrained: no file at {display(fs, path)}") from None
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"model.pretrained: cannot load {display(fs, path)}: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"model.pretrained: {display(fs, path)} is not a state dict")
    return state


def load_trained_model(directory: str | os.PathLike, cfg: Config, num_classes: int) -> nn.Module:
    """The trained model of the checkpoint in `directory` (written under `cfg`'s recipe), in
    its final stage, on CPU, in eval mode."""
    state = load_checkpoint(directory, expected_recipe=cfg.recipe())
    model = build_model(cfg.model, num_classes)
    model.load_state_dict(state["model"])
    model.set_stage(int(state["stage"]))
    return model.eval()
