"""The ``landscape`` command line (installed as ``landscape_cli``); all work is done by the library."""
