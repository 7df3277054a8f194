"""mora-retrieval: composed image retrieval and missing-modality recognition with MoRA.

Importing the package is light (no third-party imports); the toolkit is in its submodules.
"""

__version__ = "0.1.0"

from .errors import MoraError  # noqa: E402  (light: no third-party imports)

__all__ = ["MoraError", "__version__"]
