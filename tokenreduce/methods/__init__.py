"""Token-reduction methods; importing this package registers every method."""
from . import evit, tome  # noqa: F401  (registration side effect)
from . import token_transforming  # noqa: F401
from . import zero_tprune  # noqa: F401
from . import mctf  # noqa: F401
from . import top_vim  # noqa: F401
from . import cluster  # noqa: F401
from . import dtop  # noqa: F401
from .base import BlockTensors, Method, Need, Options, available_methods, get_method_class

__all__ = ["BlockTensors", "Method", "Need", "Options", "available_methods", "get_method_class"]
