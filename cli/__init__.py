"""The ``mora-ret`` command line (installed as ``mora_retrieval_cli``): parsing and printing only."""
