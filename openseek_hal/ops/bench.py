"""`openseek-hal bench`: per-op GPU benchmarks against torch eager, torch.compile, FlagGems, Liger."""

from ..cli import not_yet

bench = not_yet("bench", "issue #3: ops and bench")
