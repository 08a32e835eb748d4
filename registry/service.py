"""The registry's write side: :class:`Registry`, every operation over the database and the store.

Writers (``publish``, ``promote``, ``models add``) need the database; after each change the
affected models' index objects (``index/<model>.json``) are rewritten in the store, so that
clients with store read access alone can resolve plans (see :mod:`registry.client`). Each
responsibility lives in its own module; this class puts them together.
"""

from __future__ import annotations

from .aliases import Aliases
from .checkpoints import BUILTIN_MODELS
from .maintenance import Maintenance
from .publishing import Publisher, PublishResult

__all__ = ["BUILTIN_MODELS", "PublishResult", "Registry"]


class Registry(Aliases, Publisher, Maintenance):
    """The registry database plus its object store, with every operation on them."""
