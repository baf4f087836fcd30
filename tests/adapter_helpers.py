"""Helpers shared by tests that need several LoRA experts: made from the test adapter."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

LORA = "tests/data/lora-minilm-vader"


def two_lora_experts(tmp_path: Path, src: str = LORA) -> list[Path]:
    """Two LoRA adapter folders that share ``src``'s initial adapter (``src/init``).

    The first is ``src`` itself; the second adds 0.7 times a permutation of each tensor's
    update, so the two task vectors overlap in part, as experts from one start do.
    """
    from safetensors.numpy import load_file, save_file

    init = load_file(f"{src}/init/adapter_model.safetensors")
    ad = load_file(f"{src}/adapter_model.safetensors")
    rng = np.random.default_rng(5)
    dirs = []
    for i, mix in enumerate((0.0, 0.7)):
        d = tmp_path / f"a{i}"
        d.mkdir()
        shutil.copy(f"{src}/adapter_config.json", d)
        save_file({n: (v + mix * rng.permutation((v - init[n]).ravel()).reshape(v.shape)
                       ).astype(np.float32) for n, v in ad.items()},
                  str(d / "adapter_model.safetensors"))
        dirs.append(d)
    return dirs
