"""The offload benchmark's step-time model on cases worked out by hand, and its smoke run's JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from offload import STAGES, Link, StageFit, Stages, all_cuts, fit_splits, step_time  # noqa: E402

NO_LINK = Link(rate=math.inf, latency=0.0)


def per_micro(micro: int, **totals: float) -> Stages:
    """Stages whose totals over ``micro`` micro-batches are ``totals`` (the optimizer step as given)."""
    step = totals.pop("server_step", 0.0)
    return Stages(**{name: value / micro for name, value in totals.items()}, server_step=step)


def test_one_micro_batch_without_link_time_is_the_sum_of_the_stages() -> None:
    stages = Stages(bottom=1, trunk_forward=2, top_forward=3, top_backward=4, trunk_backward=5, server_step=0.5)
    assert step_time(stages, 1, 1e6, NO_LINK) == pytest.approx(15.5)


def test_one_micro_batch_pays_three_crossings_and_six_latencies() -> None:
    # hidden up, hidden down, dL/dh up, each 2 s on the wire; every one of the 6 messages (those three, the empty
    # backward reply, the step and its reply) arrives 0.25 s after it left.
    stages = Stages(bottom=1, trunk_forward=2, top_forward=3, top_backward=4, trunk_backward=5)
    assert step_time(stages, 1, 200.0, Link(rate=100.0, latency=0.25)) == pytest.approx(15 + 3 * 2 + 6 * 0.25)


@pytest.mark.parametrize("micro", [1, 2, 4, 8])
def test_a_link_without_compute_carries_2m_frames_up_after_the_first_one_back(micro: int) -> None:
    # Up: the m hidden states, then the m gradients, which wait for the last top, i.e. for the last output to come
    # down (one frame after the last hidden state went up): (m + 1) + m frames end to end.
    zero = Stages(0, 0, 0, 0, 0)
    assert step_time(zero, micro, 3.0, Link(rate=1.0, latency=0.0)) == pytest.approx((2 * micro + 1) * 3.0)


@pytest.mark.parametrize("micro", [3, 8, 1000])
def test_a_client_bound_step_tends_to_the_client_s_work(micro: int) -> None:
    # client: bottom 1 + tops 3 + 3 = 7; server: 2 + 2. The server's last backward pass is all that shows.
    stages = per_micro(micro, bottom=1, trunk_forward=2, top_forward=3, top_backward=3, trunk_backward=2)
    assert step_time(stages, micro, 0.0, NO_LINK) == pytest.approx(7 + 2 / micro)


@pytest.mark.parametrize("micro", [4, 1000])
def test_a_server_bound_step_tends_to_the_server_s_work(micro: int) -> None:
    # server: 5 + 6 = 11; the client's first bottom, first top forward and last top backward show.
    stages = per_micro(micro, bottom=1, trunk_forward=5, top_forward=1, top_backward=1, trunk_backward=6)
    assert step_time(stages, micro, 0.0, NO_LINK) == pytest.approx(11 + 3 / micro)


def test_many_micro_batches_tend_to_each_phase_s_bottleneck_not_the_busier_core() -> None:
    # Every top's forward pass comes before the first backward pass (one loss): the forward phase is bound by the
    # client (1 + 4 > 2), the backward phase by the server (6 > 2). Both cores have 7 of work; the step takes 11.
    stages = per_micro(10_000, bottom=1, trunk_forward=2, top_forward=4, top_backward=2, trunk_backward=6)
    assert step_time(stages, 10_000, 0.0, NO_LINK) == pytest.approx(11, rel=1e-3)


def test_the_stage_fit_recovers_fixed_and_per_layer_seconds() -> None:
    layers = 12
    fixed = dict(zip(STAGES, (3.0, 0.5, 40.0, 35.0, 0.7, 0.1)))
    per_layer = dict(zip(STAGES, (2.0, 2.5, 2.1, 1.9, 3.0, 0.2)))
    medians = {cuts: {s: fixed[s] + per_layer[s] * n for s, n in zip(STAGES, layer_counts(cuts, layers))}
               for cuts in fit_splits(layers)}
    fit = StageFit.from_medians(layers, medians)
    for cuts in all_cuts(layers):
        expected = [fixed[s] + per_layer[s] * n for s, n in zip(STAGES, layer_counts(cuts, layers))]
        assert list(vars(fit.stages(cuts)).values()) == pytest.approx(expected)


def layer_counts(cuts: tuple[int, int], layers: int) -> tuple[int, ...]:
    bottom, trunk, top = cuts[0], cuts[1] - cuts[0], layers - cuts[1]
    return bottom, trunk, top, top, trunk, trunk


@pytest.mark.slow
def test_quick_run_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "offload.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "offload.py"), "--quick", "--out", str(out)], check=True,
                   timeout=300, capture_output=True)
    data = json.loads(out.read_text())
    assert len(data["runs"]) >= 2
    for run in data["runs"]:
        for field in ("split_median_ms", "unsplit_median_ms", "ratio_to_unsplit", "predicted_ms", "model_error"):
            assert run[field] == run[field] and run[field] != 0, field  # a number, not NaN
        assert run["max_loss_diff_vs_unsplit"] < 1e-4
    assert set(data["stage_fit_ms"]["fixed"]) == set(data["stage_fit_ms"]["per_layer"]) == set(STAGES)
    assert data["loopback"]["rate"] > 0 and data["loopback"]["latency"] > 0
    assert set(data["best"]) == set(data["best_ratio"]) == {"loopback", "100 Mbit/s", "20 Mbit/s"}
    for field in ("ratio_to_unsplit", "max_abs_model_error", "first_choice", "predictions", "machine"):
        assert field in data
