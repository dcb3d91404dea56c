"""`openseek-hal conform`: run the conformance suite against a backend."""

from ..cli import not_yet

conform = not_yet("conform", "issue #4: conformance suite")
