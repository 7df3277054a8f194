"""mora-retrieval: composed image retrieval and missing-modality recognition with MoRA.

The package imports nothing heavy at import time; use the submodules:
``mora_retrieval.model``, ``mora_retrieval.adapters``, ``mora_retrieval.data``,
``mora_retrieval.engine``, ``mora_retrieval.tasks``, ``mora_retrieval.retrieval``.
"""

__version__ = "0.1.0"

from .errors import MoraError  # noqa: E402  (light: no third-party imports)

__all__ = ["MoraError", "__version__"]
