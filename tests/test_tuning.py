"""tuning: sweep sizes against written files, tune against a brute-force search, a real toy
fine-tune for the default scale rule, budgets and bad scores."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from compeft_format import Writer, dumps, inspect, save_file
from compeft_format.compress import DEFAULT_SCALE, SCALES, compress, compression_metadata
from compeft_format.container import file_alignment
from compeft_format.quality import quality_report
from compeft_format.scales import resolve_scale
from compeft_format.taskvec import apply_task_vector, state_dict_task_vector
from compeft_format.tensor import TernaryTensor
from compeft_format.tuning import (
    Candidate,
    TuneError,
    count_file_bytes,
    sweep,
    tune,
)


# ---------------------------------------------------------------------------------------------
# a tiny model, fine-tuned here
# ---------------------------------------------------------------------------------------------
class Toy:
    """A 3-layer MLP "pretrained" on one task and fine-tuned (AdamW, 20 steps) on a nearby one.

    Its inputs lie in a 6-dimensional subspace of R^32, as real activations are far from
    isotropic: the fine-tune's updates are then aligned with the data, which is what makes
    the dropped entries' effect coherent with the kept ones' (with isotropic inputs to a
    narrow net, ``"norm"`` wins instead; see the README's "Choosing density and scale").
    """

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(32, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
            torch.nn.Linear(256, 4))
        basis = torch.randn(6, 32)
        x = torch.randn(256, 6) @ basis
        w_a = torch.randn(32, 4) / 32**0.5
        w_b = w_a + 0.5 * torch.randn(32, 4) / 32**0.5
        self._fit(x, torch.tanh(x @ w_a), steps=60, lr=3e-3)
        self.base = {k: v.detach().clone().numpy() for k, v in self.net.state_dict().items()}
        self._fit(x, torch.tanh(x @ w_b), steps=20, lr=1e-3)
        self.finetuned = {k: v.detach().clone().numpy() for k, v in self.net.state_dict().items()}
        self.inputs = torch.randn(256, 6) @ basis  # held out
        self.target = self.outputs(self.finetuned)
        self.tv, _ = state_dict_task_vector(self.finetuned, self.base)

    def _fit(self, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
        opt = torch.optim.AdamW(self.net.parameters(), lr=lr)
        for _ in range(steps):
            loss = ((self.net(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    def outputs(self, weights: dict) -> torch.Tensor:
        self.net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()})
        with torch.no_grad():
            return self.net(self.inputs)

    def error(self, checkpoint: dict) -> float:
        """Mean squared distance of the outputs to the fine-tuned model's."""
        return float(((self.outputs(checkpoint) - self.target) ** 2).mean())

    def rebuilt_error(self, compressed: dict) -> float:
        return self.error(apply_task_vector(self.base, compressed))


@pytest.fixture(scope="module")
def toy() -> Iterator[Toy]:
    # one thread: these matrices are small, and several threads on a busy 2-core machine
    # make training ten times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield Toy()
    finally:
        torch.set_num_threads(threads)


def test_default_scale_rebuilds_the_finetune_better_than_the_papers_untuned_rule(toy):
    assert resolve_scale(DEFAULT_SCALE, 0.1) == "proj_vcap"  # "auto" at this density
    untouched = toy.error(toy.base)
    errors = {s: toy.rebuilt_error(compress(toy.tv, density=0.1, scale=s)) for s in SCALES}
    default = toy.rebuilt_error(compress(toy.tv, density=0.1))
    assert default == errors["proj_vcap"]
    assert default < errors["std"]  # the paper's scale at alpha 1
    # and better than the parameter-space optimum (l2) and the norm-preserving rule
    assert default < errors["l2"]
    assert default < errors["norm"]
    assert default < 0.5 * untouched  # it does rebuild most of the fine-tune


def test_tune_finds_the_brute_force_alpha(toy):
    alphas = [0.5, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0]
    brute = {}
    for a in alphas:
        brute[a] = -toy.rebuilt_error(compress(toy.tv, density=0.1, alpha=a))
    best = max(alphas, key=lambda a: brute[a])
    seen = []

    def evaluate(checkpoint: dict) -> float:
        assert set(checkpoint) == set(toy.base)  # the full checkpoint, every base tensor
        seen.append(checkpoint)
        return -toy.error(checkpoint)

    result = tune(toy.tv, evaluate, base=toy.base, densities=[0.1], alphas=alphas)
    assert result.best.alpha == best
    assert [c.alpha for c in result.candidates] == alphas
    assert {c.alpha: c.score for c in result.candidates} == brute
    assert len(seen) == len(alphas)
    # the chosen compressed tensors are compress's for that setting
    again = compress(toy.tv, density=0.1, alpha=best)
    assert result.compressed.keys() == again.keys()
    for n, t in again.items():
        assert result.compressed[n] == t, n


def test_tune_over_densities_and_without_base(toy):
    target = {n: np.asarray(v, np.float64) for n, v in toy.tv.items()}

    def evaluate(rebuilt: dict) -> float:  # the decoded task vector itself
        assert set(rebuilt) == set(toy.tv)
        return -sum(float(np.sum((rebuilt[n] - target[n]) ** 2)) for n in target)

    result = tune(toy.tv, evaluate, densities=[0.05, 0.3], alphas=[0.5, 1.0])
    grid = [(0.05, 0.5), (0.05, 1.0), (0.3, 0.5), (0.3, 1.0)]
    assert [(c.density, c.alpha) for c in result.candidates] == grid
    brute = {}
    for d, a in grid:
        out = compress(toy.tv, density=d, alpha=a)
        brute[d, a] = evaluate({n: t.to_numpy() for n, t in out.items()})
    assert {(c.density, c.alpha): c.score for c in result.candidates} == brute
    assert (result.best.density, result.best.alpha) == max(brute, key=brute.__getitem__)
    assert result.best.density == 0.3  # denser is closer, on the parameters too


def test_tune_budget_chooses_within_it_and_skips_the_rest(toy):
    calls = []

    def evaluate(rebuilt: dict) -> float:
        calls.append(1)
        return -toy.rebuilt_error(rebuilt)

    free = tune(toy.tv, evaluate, densities=[0.02, 0.3], alphas=[1.0])
    sizes = {c.density: c.bits_per_param for c in free.candidates}
    assert free.best.density == 0.3  # denser is better without a budget
    calls.clear()
    budget = (sizes[0.02] + sizes[0.3]) / 2
    capped = tune(toy.tv, evaluate, densities=[0.02, 0.3], alphas=[1.0],
                  budget_bits_per_param=budget)
    assert capped.best.density == 0.02
    assert capped.best.bits_per_param <= budget
    over = capped.candidates[1]
    assert over.status == "over budget"
    assert over.score is None
    assert len(calls) == 1  # the candidate over the budget was not evaluated
    assert capped.record()["budget_bits_per_param"] == budget
    with pytest.raises(TuneError, match="no candidate fits the budget"):
        tune(toy.tv, evaluate, densities=[0.3], alphas=[1.0], budget_bits_per_param=1e-3)


def test_tune_ties_go_to_the_smaller_file_then_the_earlier_candidate():
    tv = {"w": np.random.default_rng(0).normal(size=(64, 64))}
    result = tune(tv, lambda _t: 1.0, densities=[0.3, 0.05], alphas=[1.0, 2.0])
    assert (result.best.density, result.best.alpha) == (0.05, 1.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, "0.5", None, True])
def test_tune_refuses_a_score_that_is_not_a_finite_number(bad):
    tv = {"w": np.arange(1.0, 11.0)}
    with pytest.raises(TuneError, match=r"candidate density 0\.5, alpha 1\.5"):
        tune(tv, lambda _t: bad, densities=[0.5], alphas=[1.5])


def test_tune_lets_the_evaluations_exception_through():
    def evaluate(_t: dict) -> float:
        raise RuntimeError("my eval broke")

    with pytest.raises(RuntimeError, match="my eval broke"):
        tune({"w": np.arange(1.0, 5.0)}, evaluate)


@pytest.mark.parametrize("kwargs", [
    {"densities": []}, {"densities": [0]}, {"alphas": [-1]}, {"alphas": []},
    {"scale": "max"}, {"budget_bits_per_param": 0}, {"budget_bits_per_param": math.nan},
])
def test_tune_bad_options(kwargs):
    from compeft_format.errors import EncodeError

    with pytest.raises(EncodeError):
        tune({"w": np.arange(1.0, 5.0)}, lambda _t: 0.0, **kwargs)


# ---------------------------------------------------------------------------------------------
# sweep
# ---------------------------------------------------------------------------------------------
def test_sweep_sizes_are_those_of_the_files_written(tmp_path, toy):
    densities, scales = [0.01, 0.1, 0.5], ["proj_vcap", "norm", "std"]
    result = sweep(toy.tv, densities=densities, scales=scales, zstd_level=None)
    assert [(p.scale, p.density) for p in result.points] == [
        (s, d) for s in scales for d in densities]
    for p in result.points:
        out = compress(toy.tv, density=p.density, scale=p.scale)
        meta = {"compeft.compression": compression_metadata(p.density, 1.0, "global", p.scale)}
        path = tmp_path / f"{p.scale}-{p.density}.compeft"
        # as compress_file writes it: alignment 1 when every tensor is ternary (Appendix D 2)
        dense = not all(isinstance(t, TernaryTensor) for t in out.values())
        save_file(out, path, metadata=meta, zstd_level=None, alignment=file_alignment(dense))
        assert p.file_bytes == os.path.getsize(path)
        info = inspect(path)
        assert p.record_bytes == {t.name: t.record_size for t in info.tensors}
        assert p.dense_bytes == info.dense_size
        assert p.numel == info.numel
        assert p.nnz == sum(t.nnz for t in out.values())
        assert p.bits_per_param == pytest.approx(8 * p.file_bytes / p.numel)
        assert p.ratio == pytest.approx(info.ratio)
        assert p.quality == quality_report(toy.tv, out)
    # denser is larger
    for s in scales:
        sizes = [p.file_bytes for p in result.points if p.scale == s]
        assert sizes == sorted(sizes)


def test_sweep_with_exclude_and_custom_metadata_counts_the_dense_records():
    rng = np.random.default_rng(2)
    tv = {"w": rng.normal(size=(40, 30)).astype(np.float32),
          "head": rng.normal(size=7).astype(np.float32)}

    def meta(comp: dict) -> dict:
        return {"compeft.compression": comp, "note": "x"}

    p = sweep(tv, densities=[0.2], scales=["l2"], exclude="head", metadata=meta).points[0]
    out = compress(tv, density=0.2, scale="l2", exclude="head")
    assert isinstance(out["head"], np.ndarray)
    data = dumps(out, metadata=meta(compression_metadata(0.2, 1.0, "global", "l2")))
    assert p.file_bytes == len(data)
    assert p.numel == 1207
    assert p.dense_bytes == 4 * 1207
    assert [q.name for q in p.quality.tensors] == ["w"]  # the quality covers the compressed
    d = p.to_dict()
    assert d["quality"]["tensors"][0]["record_bytes"] == p.record_bytes["w"]
    assert d["rel_error"] == p.quality.overall.rel_error


def test_sweep_mapping_metadata_is_merged_with_the_compression_record():
    tv = {"w": np.linspace(-1, 1, 300)}
    p = sweep(tv, densities=[0.1], scales=["norm"], metadata={"a": 1}).points[0]
    meta = {"a": 1, "compeft.compression": compression_metadata(0.1, 1.0, "global", "norm")}
    out = compress(tv, density=0.1, scale="norm")  # all ternary: alignment 1, as compress_file
    assert p.file_bytes == len(dumps(out, metadata=meta, alignment=1))


def test_sweep_progress_table_and_plot(tmp_path):
    tv = {"w": np.random.default_rng(3).normal(size=(50, 50))}
    seen = []
    result = sweep(tv, densities=[0.05, 0.2], scales=["proj_vcap", "l2"], progress=seen.append)
    assert seen == list(result.points)
    table = result.format_table().splitlines()
    assert table[0].split() == ["scale", "density", "alpha", "nnz", "bytes", "bits/param",
                                "ratio", "rel_error", "cosine"]
    assert len(table) == 5
    pytest.importorskip("matplotlib")  # only the plot needs it; the checks above ran
    png = tmp_path / "sweep.png"
    result.plot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_bad_options():
    from compeft_format.errors import EncodeError

    tv = {"w": np.arange(1.0, 5.0)}
    for kwargs in ({"densities": [2]}, {"scales": ["max"]}, {"scales": []}, {"alpha": 0}):
        with pytest.raises(EncodeError):
            sweep(tv, **kwargs)


def test_count_file_bytes_matches_a_writer():
    t = TernaryTensor((100,), [3, 50], [True, False], 0.25, "F16")
    dense = np.arange(6, dtype=np.int64)
    buf = io.BytesIO()
    with Writer(buf, metadata={"k": "v"}) as w:
        w.write("a", t)
        w.write("b", dense)
    size, records = count_file_bytes([("a", t, None), ("b", dense, None)], metadata={"k": "v"})
    assert size == len(buf.getvalue())
    assert sum(records.values()) < size


def test_candidate_label_and_dict():
    c = Candidate(0.1, 1.25, "proj_vcap", "global", 1000, 8000, 0.5)
    assert c.label() == "density 0.1, alpha 1.25 (proj_vcap, global)"
    assert c.bits_per_param == 1.0
    assert c.to_dict()["score"] == 0.5
