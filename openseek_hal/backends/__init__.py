"""One module per chip backend. Each is registered through the ``openseek_hal.backends`` entry points."""
