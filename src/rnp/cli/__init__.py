"""The ``rnp`` command: a thin layer over the Python API."""
