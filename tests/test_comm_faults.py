"""Faults: dead ranks, ranks that never come, ranks that disagree. Each fails fast and clearly."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import comm_workers as w
import pytest
import torch.distributed as dist

from openseek_hal.comm import CollectiveError, CollectiveTimeoutError, launch
from openseek_hal.comm.rendezvous import init_distributed

TIMEOUT = 2.0


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_rank_that_dies_fails_the_others_quickly():
    start = time.monotonic()
    with pytest.raises(CollectiveError) as info:
        launch(w.die_on_rank_one, 2, timeout=TIMEOUT)
    assert time.monotonic() - start < TIMEOUT + 5
    text = str(info.value) + " ".join(getattr(info.value, "__notes__", []))
    assert "rank 1 exited with code 3" in text
    assert "all_reduce on rank 0 of group 'world'" in text


def test_a_rank_that_never_joins_times_out_naming_collective_rank_group(tmp_path):
    start = time.monotonic()
    with pytest.raises(CollectiveTimeoutError) as info:
        launch(w.rank_one_never_joins, 2, timeout=TIMEOUT, args=(str(tmp_path),))
    elapsed = time.monotonic() - start
    assert TIMEOUT <= elapsed < 2 * TIMEOUT + 6  # the timeout, then the grace period for rank 1
    err = info.value
    assert (err.op, err.rank, err.group) == ("all_reduce", 0, "world")
    assert "all_reduce on rank 0 of group 'world' (global ranks 0,1)" in str(err)
    assert any("rank 1 was still running" in note for note in err.__notes__)
    for rank in (0, 1):  # no process outlives launch
        assert _gone(int((tmp_path / str(rank)).read_text()))


def test_rendezvous_names_the_ranks_that_never_joined():
    store = dist.TCPStore("127.0.0.1", 0, 3, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=5))
    start = time.monotonic()
    with pytest.raises(CollectiveTimeoutError, match=r"ranks 1, 2 never joined") as info:
        init_distributed("cpu", "gloo", rank=0, world_size=3, store=store, timeout=1.0)
    assert time.monotonic() - start < 4
    assert "rendezvous on rank 0 of group 'world'" in str(info.value)
    assert not dist.is_initialized()


def test_mismatched_calls_give_one_clear_error_on_every_rank():
    out = launch(w.mismatches, 2, timeout=TIMEOUT)
    for rank, messages in enumerate(out):
        assert messages["after"] == [2.0, 2.0]
        assert f"on rank {rank} of group 'world'" in messages["shape"]
        assert "input 3 elements" in messages["shape"] and "input 4 elements" in messages["shape"]
        assert "float32" in messages["dtype"] and "bfloat16" in messages["dtype"]
        assert "sum" in messages["reduce op"] and "max" in messages["reduce op"]
        assert "all_reduce" in messages["collective"] and "broadcast" in messages["collective"]
        assert "src=0" in messages["root"] and "src=1" in messages["root"]
        assert "rank 0 sends 1 rows to rank 0, but rank 0 expects 2 rows from rank 0" in messages["splits"]
    assert out[0]["recv size"] is None  # the sender cannot know; the receiver says what happened
    assert "rank 0 sent float32[5 elements] but this rank receives into float32[6 elements]" \
        in out[1]["recv size"]


def test_bad_arguments_fail_locally():
    out = launch(w.local_errors, 2, timeout=TIMEOUT, check=False)
    for messages in out:
        assert all(messages.values()), messages
        assert "expected world_size x input = 2 x 2" in messages["all_gather size"]
        assert "'avg' needs a floating-point tensor" in messages["avg of ints"]
        assert "contiguous" in messages["non-contiguous"]


def test_launch_reraises_a_rank_exception_naming_the_rank():
    with pytest.raises(ValueError, match="bad value on purpose") as info:
        launch(w.raise_on_rank_one, 2, timeout=TIMEOUT)
    assert any("rank 1" in note for note in info.value.__notes__)
    assert "[rank 1]" in str(info.value.__cause__)


def test_unpicklable_result_is_an_error():
    with pytest.raises(CollectiveError, match="cannot be sent to the parent"):
        launch(w.unpicklable_result, 2, timeout=TIMEOUT)
