"""Host staging (`openseek_hal.comm.staging`, the ``host`` and ``hier`` adaptors): every collective at sizes
that cross chunk boundaries and odd sizes, 2 and 4 ranks, both transports, against independent references;
the device path's result buffers (forced on the CPU); ordering of async calls; dead and hung peers."""

from __future__ import annotations

import glob
import time

import pytest
import staging_workers as w

from openseek_hal.comm import CollectiveError, CollectiveTimeoutError, launch

CHUNK = 4096  # bytes: every size in staging_workers.SIZES above a few hundred elements spans chunks


def _shm_files() -> set[str]:
    return set(glob.glob("/dev/shm/openseek-hal-*"))


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_every_collective_against_the_reference(transport, world_size, monkeypatch):
    before = _shm_files()
    # the device path on the CPU: results assembled in the pinned-buffer ring, then "copied to the device"
    monkeypatch.setenv("OPENSEEK_HAL_HOST_STAGE_CPU", "1" if world_size == 2 else "0")
    results = launch(w.every_collective, world_size, adaptor="host", timeout=120,
                     options={"chunk_bytes": CHUNK, "transport": transport})
    for rank, r in enumerate(results):
        assert r["transport"] == transport
        assert r["problems"] == [], f"rank {rank}: " + "; ".join(r["problems"][:5])
    # every rank reduced in the same order: the same bits everywhere
    assert all(r["digests"] == results[0]["digests"] for r in results)
    assert _shm_files() == before  # the segment is unlinked once every rank has mapped it


def test_hier_streams_between_kinds(monkeypatch):
    """hier with two simulated chip kinds: the leaders' steps and the all-to-all go through the staging."""
    results = launch(w.every_collective, 4, adaptor="hier", timeout=120, kinds=["a", "b", "a", "b"],
                     options={"chunk_bytes": CHUNK})
    for rank, r in enumerate(results):
        assert r["problems"] == [], f"rank {rank}: " + "; ".join(r["problems"][:5])


def test_default_chunk_and_env_override(monkeypatch):
    monkeypatch.setenv("OPENSEEK_HAL_HOST_CHUNK_BYTES", "8K")
    results = launch(w.every_collective, 2, adaptor="host", timeout=120)
    assert all(r["problems"] == [] and r["transport"] == "shm" for r in results)
    monkeypatch.setenv("OPENSEEK_HAL_HOST_CHUNK_BYTES", "12 bananas")
    with pytest.raises(CollectiveError, match="OPENSEEK_HAL_HOST_CHUNK_BYTES='12 bananas' is not a size"):
        launch(w.async_in_order, 2, adaptor="host", timeout=30)


def test_async_calls_complete_in_issue_order():
    for transport in ("shm", "gloo"):
        out = launch(w.async_in_order, 2, adaptor="host", options={"transport": transport})
        assert out == [[3.0, 3.0, 30.0]] * 2


def test_a_peer_that_dies_is_named_within_a_second_not_the_timeout():
    start = time.monotonic()
    with pytest.raises(CollectiveError) as info:
        # check=False: with the consistency check on, its gloo exchange notices the death first
        launch(w.die_in_shared_memory, 2, adaptor="host", timeout=60, check=False)
    assert time.monotonic() - start < 15  # far below the 60 s timeout
    text = str(info.value) + " ".join(getattr(info.value, "__notes__", []))
    assert "rank 1 exited with code 3" in text
    assert "all_reduce on rank 0 of group 'world' (global ranks 0,1) (host adaptor) failed" in text
    assert "exited during the collective" in text


def test_a_peer_that_hangs_times_out_naming_the_collective():
    start = time.monotonic()
    with pytest.raises(CollectiveTimeoutError) as info:
        launch(w.hang_in_shared_memory, 2, adaptor="host", timeout=2.0, check=False)
    assert 2.0 <= time.monotonic() - start < 15
    err = info.value
    assert (err.op, err.rank) == ("all_reduce", 0)
    assert "timed out after 2 s" in str(err) and "rank(s) [1]" in str(err)


def test_zero1_training_through_the_host_adaptor_matches_one_rank(tmp_path, monkeypatch):
    """ZeRO-1 with small buckets: reduce-scatters launched asynchronously during backward and all-gathers of
    the weights, all through the shared-memory staging in 4 KiB chunks; float64, so the losses of 2 ranks
    equal one rank's up to the summation order (rel 1e-9 as tests/test_train_parallel.py)."""
    from rich.console import Console

    from openseek_hal.train.config import load_config
    from openseek_hal.train.trainer import train

    monkeypatch.setenv("OPENSEEK_HAL_CACHE", str(tmp_path / "cache"))
    tiny = {"global_batch_size": 8, "seq_len": 32, "lr": 1e-2, "warmup_steps": 2, "tokenizer_vocab_size": 512,
            "sample_tokens": 4, "eval_batches": 1, "log_every": 1, "model.num_hidden_layers": 2, "dtype": "fp64",
            "bucket_mb": 0.05, "steps": 3, "save": False}
    one = train(load_config(None, {**tiny, "out": str(tmp_path / "one")}),
                console=Console(file=open("/dev/null", "w"))).losses  # noqa: SIM115
    two = launch(w.train_rank, 2, adaptor="host", timeout=120, options={"chunk_bytes": CHUNK},
                 args=(load_config(None, {**tiny, "out": str(tmp_path / "two")}),))[0]
    assert len(one) == 3 and two == pytest.approx(one, rel=1e-9)
