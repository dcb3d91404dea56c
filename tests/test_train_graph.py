"""`graph_step: true`: the step captured once and replayed, checked on the CPU with an emulated device graph
(tests/graph_emulator.py: CUDA graphs' semantics, aten operators for kernels)."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from graph_emulator import RecordingGraph
from rich.console import Console

from openseek_hal.backends.cpu import CPUBackend
from openseek_hal.device import Device
from openseek_hal.errors import ConfigError, RunError
from openseek_hal.train import trainer as trainer_module
from openseek_hal.train.checkpoint import resolve_checkpoint
from openseek_hal.train.config import load_config
from openseek_hal.train.trainer import train
from openseek_hal.train.zero import DeviceSchedule, DistributedOptimizer

# fp64 weights (a verification run): the captured step reads lr and the step number from the device, where
# the bias corrections 1 - beta**step are computed again (torch.pow instead of Python's **, each within an ulp
# of float64); everything else runs the same operators in the same order. Differences start at ~1e-16
# relative and a few steps cannot grow them past 1e-12; a replay that used the capture's numbers (its lr,
# its step) or skipped an operator differs at the size of one step's update (> 1e-4 here).
TINY = {"global_batch_size": 4, "seq_len": 16, "lr": 2e-2, "warmup_steps": 4, "tokenizer_vocab_size": 300,
        "sample_tokens": 4, "eval_batches": 1, "log_every": 3, "model.num_hidden_layers": 2, "dtype": "fp64",
        "steps": 7, "grad_clip": 0.5, "graph_step": False}
RTOL = 1e-12


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENSEEK_HAL_CACHE", str(tmp_path / "cache"))


def _run(tmp_path, name, **kw):
    out = Console(file=open(tmp_path / f"{name}.log", "w"))  # noqa: SIM115
    return train(load_config(None, {**TINY, "out": str(tmp_path / name), **kw}), console=out)


def _grouped_linear_without_reads(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`grouped_linear` with no host read (the reference splits by ``counts.tolist()``): every row times every
    expert's matrix, masked by the row's group (rows past ``counts``' sum: zero, as in the reference)."""
    ends = counts.cumsum(0)
    group = (torch.arange(x.shape[0])[:, None] >= ends[None, :]).sum(1)
    return sum((group == e).unsqueeze(1).to(x.dtype) * (x @ w.T) for e, w in enumerate(weight.unbind(0)))


@pytest.fixture
def graphs(monkeypatch) -> list[RecordingGraph]:
    """Give the cpu backend (emulated) device graphs; the list collects the graphs the trainer makes. Its
    `grouped_linear` (for the eager runs too) reads nothing on the host, as the GPU backends' grouped GEMMs."""
    op = CPUBackend.op
    monkeypatch.setattr(CPUBackend, "op", lambda self, name: _grouped_linear_without_reads
                        if name == "grouped_linear" else op(self, name))
    return _emulate_graphs(monkeypatch)


def _emulate_graphs(monkeypatch) -> list[RecordingGraph]:
    """The cpu backend declares device graphs, and `Device.graph()` makes `RecordingGraph`s (returned)."""
    made: list[RecordingGraph] = []
    capabilities = CPUBackend.capabilities
    monkeypatch.setattr(CPUBackend, "capabilities", lambda self: dataclasses.replace(capabilities(self), graphs=True))
    monkeypatch.setattr(Device, "graph", lambda self: made.append(RecordingGraph()) or made[-1])
    return made


def _weights(tmp_path, name) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(resolve_checkpoint(tmp_path / name) / "rank_00000.safetensors")


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= RTOL * abs(y) for x, y in zip(a, b))


def test_replayed_steps_equal_eager_ones(tmp_path, graphs):
    eager = _run(tmp_path, "eager")
    replayed = _run(tmp_path, "graph", graph_step=True)
    assert len(graphs) == 1 and graphs[0].replays == TINY["steps"] - 1  # warm-up eager, then capture + replays
    assert len(set(eager.losses)) == len(eager.losses)  # every step moved the weights (lr warms up, clipping on)
    assert _close(replayed.losses, eager.losses), (replayed.losses, eager.losses)
    a, b = _weights(tmp_path, "graph"), _weights(tmp_path, "eager")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=RTOL, atol=RTOL * b[k].abs().max().item()), k
    assert abs(replayed.val_loss - eager.val_loss) <= RTOL * abs(eager.val_loss)
    # the captured step's device time, and its phases as the latest replay's timing events give them (on a
    # GPU, event record nodes; here host clocks read at the same places of each replay)
    logged = [json.loads(line) for line in (tmp_path / "graph" / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in logged if "loss" in row]
    assert logged and all(row["step_ms"] > 0 and row["forward_ms"] > 0 and row["backward_ms"] > 0
                          and row["optimizer_ms"] > 0 for row in logged)
    assert replayed.extra["phases_ms"].keys() == {"step", "forward", "backward", "grad_sync", "optimizer",
                                                  "weight_sync"}
    log = " ".join((tmp_path / "graph.log").read_text().split())  # the console wraps at 80 columns
    assert re.search(r"graph \d+ ms \(fwd \d+ bwd \d+ opt \d+ comm \d+ ms\)", log), log


def _attention_without_reads(q, k, v, scale=None, cu_seqlens=None):
    """`causal_attention` with no host read (the reference checks ``cu_seqlens`` on the host) and torch ops
    only (the emulated graph replays torch ops, not Triton launches): the reference's document ids without
    its checks, and a dense masked softmax."""
    from openseek_hal.ops.attention import causal_attention, unchecked_document_ids

    if cu_seqlens is None:
        return causal_attention(q, k, v, scale)
    b, _, s, _ = q.shape
    doc = unchecked_document_ids(cu_seqlens, b, s)
    pos = torch.arange(s)
    keep = (pos[None, :] <= pos[:, None])[None] & (doc[:, :, None] == doc[:, None, :])
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    return scores.masked_fill(~keep[:, None], float("-inf")).softmax(-1) @ v


def test_document_masks_are_made_again_on_every_replay(tmp_path, graphs, monkeypatch):
    """`document_mask`: the boundaries come from each batch's end-of-text tokens inside the captured step, so
    every replay masks its own batch's documents: the replayed losses are the eager ones (a replay that kept
    the capture's boundaries would mask other documents and differ from step 3 on), and they differ from an
    unmasked run's."""
    op = CPUBackend.op
    monkeypatch.setattr(CPUBackend, "op", lambda self, name: _attention_without_reads if name == "causal_attention"
                        else _grouped_linear_without_reads if name == "grouped_linear" else op(self, name))
    data = tmp_path / "docs.jsonl"
    words = "the quick brown fox jumps over a lazy dog while seven bakers sell warm bread".split()
    data.write_text("".join(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(2 + i % 5))})
                            + "\n" for i in range(300)))
    eager = _run(tmp_path, "eager", data=str(data), document_mask=True)
    replayed = _run(tmp_path, "graph", data=str(data), document_mask=True, graph_step=True)
    unmasked = _run(tmp_path, "unmasked", data=str(data))
    assert graphs and graphs[0].replays == TINY["steps"] - 1
    assert _close(replayed.losses, eager.losses), (replayed.losses, eager.losses)
    assert not _close(unmasked.losses, eager.losses)


def test_the_attention_without_reads_is_the_reference():
    from openseek_hal.ops.attention import causal_attention, eos_boundaries

    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 12, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, 12, 4, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 4, (2, 12), generator=gen)
    cu = eos_boundaries(ids, 3)
    assert torch.allclose(_attention_without_reads(q, k, v, 0.3, cu), causal_attention(q, k, v, 0.3, cu), rtol=1e-13)


def test_a_graph_without_timing_events_reports_the_whole_step(tmp_path, graphs, monkeypatch):
    """A device graph API that cannot time parts of a replay (`timing_event` None): the step as a whole."""
    monkeypatch.setattr(Device, "graph", lambda self: graphs.append(RecordingGraph(timing=False)) or graphs[-1])
    replayed = _run(tmp_path, "graph", graph_step=True, steps=4)
    logged = [json.loads(line) for line in (tmp_path / "graph" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["step_ms"] > 0 and "forward_ms" not in row for row in logged if "loss" in row)
    assert replayed.extra["phases_ms"].keys() == {"step"}


def test_accumulated_micro_batches_replay_too(tmp_path, graphs):
    eager = _run(tmp_path, "eager", micro_batch_size=2, steps=5)
    replayed = _run(tmp_path, "graph", micro_batch_size=2, steps=5, graph_step=True)
    assert graphs[0].replays == 4
    assert _close(replayed.losses, eager.losses), (replayed.losses, eager.losses)


def test_a_number_baked_into_the_capture_is_caught(tmp_path, graphs, monkeypatch):
    """The emulation is not blind: an update that takes lr and the step as numbers (the eager path) inside
    the capture replays the capture's values, and the losses leave the eager run's."""
    eager = _run(tmp_path, "eager")
    update, set_schedule = DistributedOptimizer.update, DeviceSchedule.set

    def remember(self, lr, step):
        self.numbers = (lr, step)
        set_schedule(self, lr, step)

    monkeypatch.setattr(DeviceSchedule, "set", remember)
    monkeypatch.setattr(DistributedOptimizer, "update",  # the step's lr as a number: right when the Python runs
                        lambda self, lr, clip, schedule=None: update(self, schedule.numbers[0], clip))
    baked = _run(tmp_path, "graph", graph_step=True)
    assert baked.losses[:3] == pytest.approx(eager.losses[:3], rel=RTOL)  # warm-up, capture: still right
    assert max(abs(x - y) / abs(y) for x, y in zip(baked.losses, eager.losses)) > 1e-4


@pytest.mark.parametrize("read", [lambda x: x.sum().item(), lambda x: x.tolist(), lambda x: x.nonzero()])
def test_a_host_read_inside_the_capture_fails(read):
    with pytest.raises(RuntimeError, match="reads a device value on the host"), RecordingGraph().capture():
        read(torch.ones(3) * 2)


def test_the_reference_grouped_linear_would_fail_a_capture(tmp_path, monkeypatch):
    """Why the fixture swaps `grouped_linear`: the cpu backend's reference reads the split sizes."""
    _emulate_graphs(monkeypatch)
    with pytest.raises(RunError, match=r"graph_step: the training step could not be captured \(Tensor.tolist reads"):
        _run(tmp_path, "graph", steps=3, graph_step=True)


def test_the_grouped_linear_without_reads_is_the_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    counts = torch.tensor([4, 0, 5])
    from openseek_hal.ops.grouped import grouped_linear

    assert torch.allclose(_grouped_linear_without_reads(x, w, counts), grouped_linear(x, w, counts), rtol=1e-14)


def test_capture_runs_nothing_and_replay_runs_it(tmp_path):
    graph = RecordingGraph()
    w = torch.zeros(3)
    with graph.capture():
        w.add_(torch.ones(3))
    assert w.tolist() == [0.0, 0.0, 0.0]
    graph.replay()
    graph.replay()
    assert w.tolist() == [2.0, 2.0, 2.0]


def test_without_device_graphs_the_step_runs_eagerly_with_a_notice(tmp_path):
    eager = _run(tmp_path, "eager", steps=3)
    fallback = _run(tmp_path, "fallback", steps=3, graph_step=True)
    assert fallback.losses == eager.losses
    assert "has no device graphs; running eagerly" in (tmp_path / "fallback.log").read_text()


@pytest.mark.parametrize("key", ["fp8", "optimizer_overlap"])
def test_graph_step_refuses_what_a_capture_cannot_hold(key):
    with pytest.raises(ConfigError, match=f"graph_step does not run with {key}"):
        load_config(None, {**TINY, "graph_step": True, key: True})


def _resolve(graph_step, world_size: int = 1, **kw):
    """What `_graphed_step` makes of ``graph_step`` on the cpu backend (graphs as the fixture gives them)."""
    class Ranks:  # only what `_graphed_step` asks of the layout
        pass

    t = trainer_module._Run.__new__(trainer_module._Run)
    t.cfg = load_config(None, {**TINY, "graph_step": graph_step, **kw})
    t.layout = Ranks()
    t.layout.world_size = world_size
    t.backend, t.console = CPUBackend(), Console(file=open("/dev/null", "w"))  # noqa: SIM115
    t.optimizer, t.device = None, torch.device("cpu")
    return t._graphed_step(None)


def test_graph_step_refuses_more_than_one_rank(graphs):
    with pytest.raises(ConfigError, match="graph_step runs on one rank; this job has 2"):
        _resolve(True, world_size=2)


def test_auto_captures_where_true_would_and_runs_the_rest_eagerly(graphs):
    """The default: one rank on a backend with device graphs is captured; more ranks, what `true` refuses
    (here `optimizer_overlap`; fp8 the same way) and a profiled run are eager, without an error."""
    assert load_config(None, {}).graph_step == "auto"
    assert _resolve("auto") is not None and _resolve(True) is not None
    assert _resolve("auto", world_size=2) is None
    assert _resolve("auto", optimizer_overlap=True) is None
    assert _resolve("auto", profile_step=3) is None
    assert _resolve(False) is None


def test_auto_is_eager_without_device_graphs():
    assert _resolve("auto") is None  # the cpu backend as it is: no device graphs (and no notice)


def test_the_default_run_is_the_graphed_one(tmp_path, graphs):
    """`graph_step` left at its default on a backend with graphs: the same run as `graph_step: true`."""
    default = train(load_config(None, {**{k: v for k, v in TINY.items() if k != "graph_step"}, "steps": 4,
                                       "out": str(tmp_path / "default")}),
                    console=Console(file=open(tmp_path / "default.log", "w")))  # noqa: SIM115
    assert len(graphs) == 1 and graphs[0].replays == 3
    assert "graph_step=auto: the step is captured" in " ".join((tmp_path / "default.log").read_text().split())
    assert default.losses == _run(tmp_path, "graph", graph_step=True, steps=4).losses


@pytest.mark.parametrize("value, expected", [(True, "true"), (False, "false"), ("auto", "auto"), ("true", "true")])
def test_graph_step_takes_yaml_booleans_and_words(value, expected):
    assert load_config(None, {"graph_step": value}).graph_step == expected


def test_graph_step_rejects_other_values():
    with pytest.raises(ConfigError, match="graph_step must be one of auto, true, false"):
        load_config(None, {"graph_step": "sometimes"})


def test_a_graphed_run_resumes_from_its_checkpoint(tmp_path, graphs):
    """Checkpoints written between replays hold the replayed weights: a graphed run resumed from step 4
    continues as the uninterrupted one (its first step after the resume is again an eager warm-up)."""
    straight = _run(tmp_path, "straight", graph_step=True, save_every=4)
    ckpt = tmp_path / "straight" / "checkpoints" / "step_000004"
    resumed = train(load_config(None, {**TINY, "out": str(tmp_path / "resumed"), "graph_step": True}), resume=ckpt,
                    console=Console(file=open(tmp_path / "resumed.log", "w")))  # noqa: SIM115
    assert _close(resumed.losses, straight.losses), (resumed.losses, straight.losses)


def test_autocast_steps_replay_too(tmp_path, graphs):
    """`dtype: autocast` (fp32 weights, bf16 compute): the autocast region opens and closes inside the captured
    step, so its cast cache never outlives the capture; the replayed losses equal the eager ones."""
    eager = _run(tmp_path, "eager", dtype="autocast", steps=4)
    replayed = _run(tmp_path, "graph", dtype="autocast", steps=4, graph_step=True)
    assert len(graphs) == 1 and graphs[0].replays == 3
    # the same bf16 operators in the same order; only the bias corrections' float64 pow differs (~1e-16)
    assert all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(replayed.losses, eager.losses, strict=True))


def test_recomputed_blocks_replay_too(tmp_path, graphs):
    eager = _run(tmp_path, "eager", recompute=True, steps=5)
    replayed = _run(tmp_path, "graph", recompute=True, steps=5, graph_step=True)
    assert _close(replayed.losses, eager.losses), (replayed.losses, eager.losses)
