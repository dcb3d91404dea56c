"""The CuPy-NCCL adaptor's pieces that need no GPU: availability, dtype/op codes, unique-id transport."""

from __future__ import annotations

import sys

import pytest
import torch

from openseek_hal.comm import CollectiveError, adaptor_available, create, nccl
from openseek_hal.errors import UserError


def test_unavailable_without_cupy_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError, with or without CuPy
    ok, reason = adaptor_available("nccl")
    assert not ok and "CuPy" in reason and "cupy-cuda" in reason
    with pytest.raises(CollectiveError, match="adaptor 'nccl' is not available: CuPy"):
        create("nccl", "cpu")


def test_launch_refuses_an_unavailable_adaptor(monkeypatch):
    from openseek_hal.comm import launch

    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(UserError, match="adaptor 'nccl' is not available"):
        launch(print, 2, adaptor="nccl")


def test_importing_the_adaptor_does_not_import_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    import importlib

    importlib.reload(nccl)  # would raise if the module imported CuPy at import time


def test_dtype_and_reduce_op_codes_match_nccl_h():
    # ncclDataType_t / ncclRedOp_t from nccl.h
    assert nccl.nccl_dtype(torch.float32) == 7 and nccl.nccl_dtype(torch.bfloat16) == 9
    assert nccl.nccl_dtype(torch.float16) == 6 and nccl.nccl_dtype(torch.int64) == 4
    assert nccl.nccl_dtype(torch.uint8) == 1 and nccl.nccl_dtype(torch.float8_e4m3fn) == 10
    assert nccl.NCCL_OPS == {"sum": 0, "max": 2, "min": 3, "avg": 4}
    with pytest.raises(CollectiveError, match="no data type for torch.complex64"):
        nccl.nccl_dtype(torch.complex64)


def test_unique_id_survives_the_store_round_trip():
    uid = tuple(((i * 37) % 256) - 128 for i in range(nccl.UNIQUE_ID_BYTES))  # CuPy: signed chars
    data = nccl.encode_unique_id(uid)
    assert isinstance(data, bytes) and len(data) == 128
    assert nccl.decode_unique_id(data) == uid
    with pytest.raises(ValueError):
        nccl.encode_unique_id(uid[:5])
