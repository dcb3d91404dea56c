"""``python -m openseek_hal`` is the ``openseek-hal`` command."""

from .cli import main

main()
