"""Format 1.2 (spec 5.9, 5.2, 7.3): column packs and compressed metadata.

Each new rule has its invalid vector (tests/test_vectors.py runs them on every path); here:
the writer's 1.2 choices, that 1.2 files read back like the 1.0 file of the same content on
every path, that the spec's text and the code agree (dictionary, example table), and that
every cut and bit flip of a small 1.2 file is refused.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
import sys
from typing import Any

import numpy as np
import pytest
from file_helpers import READERS, kinds, refuse_every_cut_and_flip
from spec_helpers import ROOT, SPEC, check_fixed_dictionary

from compeft_format import TernaryTensor, dumps, loads, open_file
from compeft_format import _spec as S
from compeft_format.codecs.golomb import choose_parameter
from compeft_format.metadata import stage_metadata
from compeft_format.packtable import Member, column_table, predicted_param

sys.path.insert(0, str(ROOT / "spec" / "tools"))
import reference_reader as rr

#: metadata as the reference compressor writes it for an adapter measured from its init
META = {
    "compeft.base": {"digests": "8NPzzMrg88w6UPPM4Q3zzJ8DKq5i3fPM", "name": "init",
                     "sha256": "sha256:" + "dcd42fd65523f5f30bcef528e24d7fc6" * 2},
    "compeft.compression": {"alpha": 1.0, "density": 0.05, "method": "compeft",
                            "scale": "proj_vcap", "scope": "global"},
    "compeft.producer": "compeft_format 0.1.0",
    "safetensors.metadata": {"format": "pt"},
    "task_vector": {"delta_all_but": [], "exclude": [], "peft_type": "LORA",
                    "reference": "checkpoint"},
}


def _ternary(shape: tuple[int, ...], density: float, seed: int, dtype: str = "F32",
             ) -> TernaryTensor:
    rng = np.random.default_rng(seed)
    numel = math.prod(shape)
    idx = np.sort(rng.choice(numel, int(numel * density), replace=False))
    return TernaryTensor(shape, idx, rng.random(len(idx)) < 0.5, float(rng.random()), dtype)


def adapter() -> dict[str, Any]:
    """LoRA-like tensors in packs, a dense tensor and a tensor too big to pack between them."""
    out: dict[str, Any] = {}
    for i in range(4):
        for m, dtype in (("q", "F32"), ("v", "BF16")):
            stem = f"model.layers.{i}.self_attn.{m}_proj"
            out[f"{stem}.lora_A.weight"] = _ternary((8, 96), 0.05, 2 * i, dtype)
            out[f"{stem}.lora_B.weight"] = _ternary((96, 8), 0.3, 2 * i + 1, dtype)
    out["model.layers.2.big"] = _ternary((S.PACK_MEMBER_MAX_NUMEL + 1,), 0.001, 99)
    out["model.layers.2.norm"] = np.linspace(-1, 1, 7, dtype=np.float32)
    out["model.layers.2.scalar"] = TernaryTensor((), [0], [True], 2.5, "F16")
    out["model.layers.2.zero"] = TernaryTensor((0, 4), [], [], 0.0)
    return out


def same(a: Any, b: Any) -> bool:
    return a == b if isinstance(a, TernaryTensor) else np.array_equal(a, b)


@pytest.mark.parametrize("alignment", [1, 8])
@pytest.mark.parametrize("positions", ["auto", "golomb", "bitmask"])
def test_1_2_files_read_back_like_1_0_files(positions: str, alignment: int) -> None:
    tensors = adapter()
    new = dumps(tensors, metadata=META, positions=positions, alignment=alignment, version="1.2")
    old = dumps(tensors, metadata=META, positions=positions, alignment=alignment, version="1.0")
    v11 = dumps(tensors, metadata=META, positions=positions, alignment=alignment, version="1.1")
    assert (new[9], new[11]) == (2, S.FLAG_METADATA_ZSTD)  # 1.2, metadata compressed
    assert (v11[9], v11[11]) == (1, 0)
    assert S.KIND_COLUMN_PACK in kinds(new)
    assert S.KIND_PACK not in kinds(new)
    assert len(new) < len(v11) < len(old)
    want = loads(old)
    for name, read in READERS.items():
        got = read(new)
        assert list(got) == list(want), name
        assert all(same(got[k], want[k]) for k in want), name
    with open_file(new) as f:
        assert f.metadata() == META
        assert f.version == (1, 2)
    assert rr.read_stream(new) == rr.read_stream(old)
    assert rr.read_random(new) == rr.read_stream(old)
    assert dumps(loads(new), metadata=META, positions=positions, alignment=alignment,
                 version="1.2") == new


def test_writer_compresses_metadata_only_where_it_pays() -> None:
    t = {"a": TernaryTensor((8,), [0], [False], 1.0)}
    small = {"compeft.producer": "spec"}
    assert dumps(t, metadata=small, version="1.2")[11] == 0  # under 64 bytes: stored as JSON
    assert dumps(t, metadata=META, zstd_level=None, version="1.2")[11] == 0  # zstd disabled
    data = dumps(t, metadata=META, version="1.2")
    json_size = len(json.dumps(META, sort_keys=True, separators=(",", ":")))
    stored = struct.unpack_from("<I", data, 12)[0]
    assert data[11] == S.FLAG_METADATA_ZSTD
    assert stored < 0.6 * json_size  # the dictionary knows the keys
    # 66 bytes of JSON around 48 random bytes in base64: a frame would be larger
    text = json.dumps({"k": base64.b64encode(np.random.default_rng(0).bytes(48)).decode()})
    assert len(text) >= 64
    assert stage_metadata(text.encode(), 3) == (0, text.encode())


def test_metadata_dictionary_is_the_spec_text() -> None:
    from_spec = check_fixed_dictionary("7.3", S.METADATA_DICTIONARY, rr.METADATA_DICTIONARY,
                                       S.METADATA_DICTIONARY_SHA256)
    assert len(from_spec) == 980


def test_column_table_example_of_the_spec() -> None:
    m = [Member(b"a.w", "F32", (8,), 1, S.BLOCK_BITMASK, 0, 1),
         Member(b"b.w", "F32", (64,), 2, S.BLOCK_GOLOMB, 23, 2)]
    example = re.search(r"have the table \(hex, columns separated by `\|`\):\n`([0-9a-f |]+)`",
                        SPEC)
    assert example is not None
    assert column_table(m).hex(" ") == " ".join(example.group(1).replace("|", " ").split())


def test_predicted_param_is_the_encoders_start_for_99_percent() -> None:
    """Spec 5.9: the fixed-point prediction equals the Gallager-Van Voorhis M0 of 6.2.3."""
    agree = total = 0
    for numel in (100, 768, 3072, 12288, 65536, S.PACK_MEMBER_MAX_NUMEL):
        for nnz in np.unique(np.geomspace(1, numel - 1, 300).astype(int)):
            theta = 1 - nnz / numel
            m0 = min(max(1, math.ceil(math.log1p(theta) / -math.log(theta))), numel)
            q = predicted_param(S.BLOCK_GOLOMB, numel, int(nnz))
            assert abs(q - m0) <= 1, (numel, nnz, q, m0)
            agree += q == m0
            total += 1
    assert agree / total >= 0.99, agree / total


def test_param_deltas_are_small_on_real_sparsity() -> None:
    """The encoder's M (6.2.3) lies within 1 of the prediction: one byte per member at most."""
    for numel, density in ((3072, 0.01), (3072, 0.1), (12288, 0.05), (768, 0.3)):
        t = _ternary((numel,), density, numel)
        gaps = np.diff(np.concatenate(([-1], t.indices))) - 1
        m = choose_parameter(gaps, numel)
        assert abs(m - predicted_param(S.BLOCK_GOLOMB, numel, t.nnz)) <= 1


def test_cuts_and_bit_flips_of_a_1_2_file_are_refused() -> None:
    """Every cut and every single-bit flip is an error on every path (a checksum on every byte)."""
    data = dumps({"a": _ternary((64,), 0.2, 1), "ab": _ternary((40,), 0.3, 2, "BF16")},
                 metadata=META, version="1.2")
    assert data[11] == S.FLAG_METADATA_ZSTD
    assert kinds(data) == [S.KIND_COLUMN_PACK]
    # Version_Minor (byte 9): 1.3 and later readers read the same; 0 and 1 refuse
    refuse_every_cut_and_flip(data, unchecked=[9])
