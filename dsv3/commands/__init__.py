"""Command groups of the ``dsv3`` command, one module each (see :mod:`dsv3.cli`)."""
