"""Acme CCL: an example out-of-tree collective library for openseek-hal.

Three pieces, as a chip vendor would ship them:

- `process_group`: the library registered with torch.distributed as the process-group backend
  ``acme`` (here a Python ``ProcessGroup`` that counts its calls and hands the bytes to gloo:
  the place a vendor's CCL goes);
- `adaptor`: the openseek-hal communicator adaptor ``acme`` (entry point
  ``openseek_hal.comm_adaptors``), whose collectives run on an ``acme`` process group;
- `backend`: the CPU-type backend ``acme`` (entry point ``openseek_hal.backends``) whose
  ``dist_backend`` is ``acme`` and whose ``comm_adaptor`` is ``acme``.

Nothing in openseek-hal is edited for any of it.
"""
