"""benchmarks/train/loss_band.py: its generated corpus, its smoothing and band rule, and one tiny run on the CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
from benchmark_scripts import load_script

load_script("train/bench_train.py")  # loss_band imports it by name, as it does when run from its folder
band = load_script("train/loss_band.py")


def test_structured_corpus_has_successors_and_copies():
    vocab = 5000
    docs = band.structured_ids(20_000, vocab, seed=3)
    ids = np.concatenate(docs)
    assert ids.min() >= 1 and ids.max() < vocab and len(ids) >= 20_000 - len(docs)
    # the same seed gives the same corpus; the successor table is drawn first, so rebuild it
    again = band.structured_ids(20_000, vocab, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(docs, again, strict=True))
    successors = np.random.default_rng(3).integers(1, vocab, size=(vocab, 4))
    favoured = sum(int((successors[doc[:-1]] == doc[1:, None]).any(axis=1).sum()) for doc in docs)
    pairs = sum(len(doc) - 1 for doc in docs)
    # 1/2 of the draws by construction, plus chance hits (4/4999) of the others; copies keep their source's pairs
    assert 0.45 < favoured / pairs < 0.55
    # copied spans (a copy starts at 1% of the positions and is 8-32 long: ~17% of the tokens, ~10% of the
    # 8-grams repeat one before them); Zipf draws and successor chains over 5000 ids almost never repeat 8 ids
    repeats = 0
    for doc in docs:
        grams = [tuple(doc[i:i + 8]) for i in range(len(doc) - 8)]
        repeats += len(grams) - len(set(grams))
    assert 0.05 * pairs < repeats < 0.2 * pairs


def test_smooth_is_a_trailing_mean():
    x = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0]
    got = band.smooth(x, 3)
    assert np.isnan(got[:2]).all()
    np.testing.assert_allclose(got[2:], [8 / 3, 2.0, 10 / 3, 5.0])


def _curves(rng: np.random.Generator, n: int, steps: int = 200) -> list[list[float]]:
    t = np.arange(steps)
    base = 11.0 * np.exp(-t / 60) + 4.0
    return [list(base + 0.02 * rng.standard_normal() + 0.1 * rng.standard_normal(steps)) for _ in range(n)]


def test_band_accepts_another_seed_and_rejects_a_shift():
    rng = np.random.default_rng(0)
    runs = _curves(rng, 6)
    baseline, same = runs[:5], runs[5]
    v = band.band_verdict(baseline, same, window=20)
    assert v["inside"] and v["fraction_inside"] >= 0.95
    # the mean and sd by hand at the last step: the band the docstring promises
    last = np.array([np.mean(b[-20:]) for b in baseline])
    half = 2.776 * last.std(ddof=1) * np.sqrt(1 + 1 / 5)
    assert v["mean_half_width"] > 0 and v["baseline_last_window_mean"] == pytest.approx(last.mean())
    shifted = list(np.asarray(same) + np.where(np.arange(200) >= 100, 0.3 + 3 * half, 0.0))
    v = band.band_verdict(baseline, shifted, window=20)
    assert not v["inside"] and v["fraction_inside"] < 0.6
    # the trailing window reaches the shift at step 101 (1-based) and is past the band a few steps later
    assert 101 <= v["first_step_outside"] <= 120 and v["worst_excursion_half_widths"] > 1
    with pytest.raises(ValueError, match="two baseline"):
        band.band_verdict(baseline[:1], same, window=20)


def test_a_steady_gap_to_the_twin_shows_inside_a_wide_band():
    """Three seeds far apart make a wide band: a candidate 0.2 above its own seed's run is inside it, and the
    paired difference names the gap exactly (smoothing is linear: the gap of the smoothed curves is 0.2)."""
    rng = np.random.default_rng(1)
    t = np.arange(300)
    baseline = [list(11.0 * np.exp(-t / 80) + 4.0 + offset + 0.05 * rng.standard_normal(300))
                for offset in (-0.5, 0.0, 0.5)]
    candidate = list(np.asarray(baseline[1]) + 0.2)
    v = band.band_verdict(baseline, candidate, window=20, twin=1)
    assert v["inside"]
    assert v["paired_gap_last_window"] == pytest.approx(0.2) and v["paired_gap_mean"] == pytest.approx(0.2)
    sd = np.std([np.mean(b[-20:]) for b in baseline], ddof=1)  # ~0.5: the offsets
    assert v["paired_gap_mean_in_seed_sd"] == pytest.approx(0.2 / sd, rel=0.05)
    assert "paired_gap_mean" not in band.band_verdict(baseline, candidate, window=20, twin=None)


def test_tiny_run_on_the_cpu(tmp_path):
    """The script end to end: two baseline seeds, a candidate at both (each paired with its own twin)."""
    out = tmp_path / "out"
    rc = band.main(["--out", str(out), "--data", str(tmp_path / "data"), "--backend", "cpu", "--model", "tiny",
                    "--steps", "8", "--window", "4", "--seeds", "0,1", "--candidates", "bf16moments",
                    "--candidate-seeds", "0,1", "--vocab", "256", "--data-tokens", "60000", "--batch-size", "2",
                    "--seq-len", "32", "--lr", "3e-3", "--warmup", "2", "--eval-batches", "1"])
    report = json.loads((out / "loss_band.json").read_text())
    runs = {(r["name"], r["seed"]): r for r in report["runs"]}
    assert set(runs) == {("baseline", 0), ("baseline", 1), ("bf16moments", 0), ("bf16moments", 1)}
    assert all(r["rc"] == 0 and len(r["losses"]) == 8 for r in runs.values())
    # every step's loss is the run's own (metrics.jsonl), not a copy of another run's
    assert runs["baseline", 0]["losses"] != runs["baseline", 1]["losses"]
    first = json.loads((out / "run-baseline-seed0" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] == runs["baseline", 0]["losses"][0]
    assert "moment_dtype=bf16" in runs["bf16moments", 0]["command"]
    assert set(report["verdicts"]) == {"bf16moments", "bf16moments@1"}
    assert rc == (0 if all(v["inside"] for v in report["verdicts"].values()) else 1)
    assert report["env"]["commit"] and report["command"]
    for key, seed in (("bf16moments", 0), ("bf16moments@1", 1)):  # each gap is to the same seed's baseline
        twin = band.smooth(runs["baseline", seed]["losses"], 4)
        cand = band.smooth(runs["bf16moments", seed]["losses"], 4)
        assert report["verdicts"][key]["paired_gap_last_window"] == pytest.approx(cand[-1] - twin[-1], abs=1e-12)
    gaps = [report["verdicts"][k]["paired_gap_mean"] for k in ("bf16moments", "bf16moments@1")]
    summary = report["paired_gaps"]["bf16moments"]
    assert summary["seeds"] == 2 and summary["mean_of_paired_gap_means"] == pytest.approx(np.mean(gaps))
    assert summary["sd"] == pytest.approx(np.std(gaps, ddof=1))
