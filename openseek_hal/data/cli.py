"""`openseek-hal data`: the data pipeline stages."""

from ..cli import not_yet

data = not_yet("data", "issue #7: data tools")
