"""Conformance: checks that a backend computes what the reference computes (ops, collectives, model).

`run_suite` runs the levels a `SuiteConfig` names and returns a `SuiteResult`; ``reports`` renders
it (terminal, JSON, HTML, Markdown, JUnit XML); ``openseek-hal conform`` is the command line.
"""

from .records import CheckResult, SuiteResult
from .suite import SuiteConfig, run_suite

__all__ = ["CheckResult", "SuiteConfig", "SuiteResult", "run_suite"]
