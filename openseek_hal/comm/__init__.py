"""Collectives: the `Communicator` contract that the trainer's data- and expert-parallel traffic uses.

This module holds the contract only; the adaptors (torch.distributed, direct NCCL, host-staged,
hierarchical) arrive with the collectives issue.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Work(Protocol):
    """Handle of an asynchronous collective."""

    def wait(self) -> None: ...


@runtime_checkable
class Communicator(Protocol):
    """A group of ranks and the collectives among them; every call may be async (``async_op=True``)."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False) -> Work | None: ...

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False) -> Work | None: ...

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: str = "sum",
                       async_op: bool = False) -> Work | None: ...

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
                          output_split_sizes: list[int] | None = None,
                          input_split_sizes: list[int] | None = None,
                          async_op: bool = False) -> Work | None: ...

    def broadcast(self, tensor: torch.Tensor, src: int, async_op: bool = False) -> Work | None: ...

    def send(self, tensor: torch.Tensor, dst: int) -> None: ...

    def recv(self, tensor: torch.Tensor, src: int) -> None: ...

    def barrier(self) -> None: ...


__all__ = ["Communicator", "Work"]
