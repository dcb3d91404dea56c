"""Collectives on the CPU (gloo): every adaptor, world sizes 2-4, against exact expected values."""

from __future__ import annotations

import comm_workers as w
import pytest
import torch

from openseek_hal.comm import CollectiveError, Communicator, create, launch
from openseek_hal.comm.base import BaseCommunicator
from openseek_hal.conformance import collectives as cc


@pytest.mark.parametrize("adaptor", ["torch", "host", "hier"])
def test_every_collective_matches_expected_values(adaptor):
    rows = cc.run_collective_checks("cpu", [adaptor], [2, 3, 4], quick=True)
    assert {r["world_size"] for r in rows} == {2, 3, 4}
    bad = [r for r in rows if r["status"] != "pass"]
    assert not bad, bad[:5]
    assert len(rows) == 3 * len(cc.cases(2, quick=True))
    # the checks cover what the issue asks for
    names = " ".join(r["name"] for r in rows)
    for needle in ("all_reduce/avg/bfloat16/7", "all_reduce/sum/int64/0", "all_to_all_single/uneven1/int64",
                   "reduce_scatter/avg/float32/7", "send_recv/bfloat16", "new_group", "barrier",
                   "all_to_all_single/sender_empty/int64", "all_to_all_single/receiver_empty/bfloat16",
                   "all_to_all_single/one_hot/float32", "all_to_all_single/all_empty/int64"):
        assert needle in names
    keys = {"level", "name", "op", "adaptor", "world_size", "dtype", "shape", "status", "max_abs_err",
            "message"}
    assert all(set(r) == keys and r["level"] == "comm" for r in rows)


class _OffByOne(BaseCommunicator):
    """A one-rank communicator whose all_reduce is wrong: the checks must catch it."""

    adaptor = "broken"

    def __init__(self):
        super().__init__(rank=0, world_size=1, group_name="solo", global_ranks=[0],
                         device=torch.device("cpu"), timeout=1.0)

    def _all_reduce(self, tensor, op, async_op):
        tensor.add_(1)

    def _all_gather(self, output, input, async_op):
        output.copy_(input.view_as(output))

    def _reduce_scatter(self, output, input, op, async_op):
        output.copy_(input.view_as(output))

    def _all_to_all_single(self, output, input, output_splits, input_splits, async_op):
        output.copy_(input)

    def _broadcast(self, tensor, src, async_op):
        pass

    def _barrier(self):
        pass

    def _new_group(self, ranks):
        return self


def test_checks_catch_a_wrong_result():
    results = {name: (status, err, msg) for name, status, err, msg in cc.check_rank(_OffByOne(), quick=True)}
    assert results["all_reduce/sum/float32/7"][:2] == ("fail", 1.0)
    assert results["all_reduce/max/float32/1"][0] == "fail"
    assert results["all_reduce/sum/float32/0"][0] == "pass"  # nothing to get wrong
    assert results["all_gather/float32/7"][:2] == ("pass", 0.0)
    # a one-rank group cannot send to itself: that check errors, and the rest are not run
    assert results["send_recv/float32"][0] == "error" and "itself" in results["send_recv/float32"][2]
    assert results["all_reduce/sum/int64/1"][0] == "error"


def test_compare_uses_tolerance_only_for_inexact_results():
    exact = cc.Case("x", "all_reduce", torch.bfloat16, (1,), None)
    inexact = cc.Case("x", "all_reduce", torch.bfloat16, (1,), None, exact=False)
    expected = torch.tensor([1 / 3], dtype=torch.float64)
    got = expected.to(torch.bfloat16)
    assert cc._compare(exact, got, expected)[0] == "fail"
    assert cc._compare(inexact, got, expected)[0] == "pass"
    assert cc._compare(inexact, got + 0.1, expected)[0] == "fail"


def test_launch_returns_per_rank_results_in_order():
    assert launch(w.rank_and_sum, 3) == [(r, 3, 6.0) for r in range(3)]


def test_communicator_satisfies_protocol():
    assert isinstance(_OffByOne(), Communicator)


def test_hier_groups_ranks_by_kind():
    kinds = ["npu", "gpu", "gpu", "npu"]
    out = launch(w.hier_layout, 4, adaptor="hier", kinds=kinds)
    assert all(k == kinds and t == [3.0, 3.0, 3.0] for k, t in out)


def test_backend_communicator_and_create_outside_a_job(monkeypatch):
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    from openseek_hal.backend import get_backend

    with pytest.raises(CollectiveError, match="torchrun"):
        get_backend("cpu").communicator()
    with pytest.raises(CollectiveError, match="unknown adaptor"):
        create("smoke-signals", "cpu")
