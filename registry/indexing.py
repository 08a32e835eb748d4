"""The store indexes (``index/<model>.json``): written from the database after each change,
checked and rebuilt by maintenance; clients with store access alone resolve plans from them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from .errors import NotFound, Unreachable
from .index import encode_index, index_key
from .models import ModelAlias
from .reading import Reader
from .rows import model_info

INDEX_ATTEMPTS = 5


class Indexed(Reader):
    """A registry that keeps the store indexes in step with the database."""

    def models_of(self, source: str) -> list[str]:
        """The model aliases of a checkpoint source, whose indexes a change to it touches (an
        index also holds the aliased plans of the source's other revisions)."""
        with self.session() as session:
            return list(session.scalars(select(ModelAlias.name).where(ModelAlias.source == source)))

    def index_bytes(self, name: str) -> bytes | None:
        """The index document the database gives for model ``name`` (None: no such model)."""
        with self.session() as session:
            row = session.scalar(select(ModelAlias).where(ModelAlias.name == name))
            if row is None:
                return None
            model = model_info(row)
            entries = self.entries(session, model.source, model.revision, any_revision=True)
            served = [  # ready versions only; of other revisions only aliased ones (rule 6)
                s
                for e in entries
                if (s := e.servable() if e.key.revision == model.revision else e.aliased())
            ]
            return encode_index(model, served)

    def write_indexes(self, names: list[str]) -> None:
        """Rewrite the store index of each model, outside any database transaction.

        After writing, the index is computed again: when a concurrent change committed
        meanwhile (and a slower writer may have put older bytes), it is written again, so the
        last index written reflects every committed change. A store failure says that the
        change itself is committed and how to repair the index.
        """
        for name in sorted(set(names)):
            data = self.index_bytes(name)
            for _ in range(INDEX_ATTEMPTS):
                if data is None:
                    break
                try:
                    self.store.put(index_key(name), data)
                except Unreachable as exc:
                    raise Unreachable(
                        f"{exc}; the change is committed but the store index of {name} is not "
                        "updated: run `invardiff-registry index rebuild` once the store is back"
                    ) from None
                written, data = data, self.index_bytes(name)
                if data == written:
                    break

    def check_indexes(self, rebuild: bool = False) -> dict[str, Any]:
        """Compare every model's store index with the database; ``rebuild`` rewrites bad ones.

        Returns ``{"checked", "failures": [{"object_key", "problem": "missing index"|"stale
        index"}], "rewritten": [keys]}``.
        """
        failures, rewritten = [], []
        names = [m.name for m in self.models()]
        for name in names:
            key = index_key(name)
            try:
                stored = self.store.get(key)
            except NotFound:
                stored = None
            if stored == self.index_bytes(name):
                continue
            problem = "missing index" if stored is None else "stale index"
            failures.append({"object_key": key, "problem": problem})
            if rebuild:
                self.write_indexes([name])
                rewritten.append(key)
        return {"checked": len(names), "failures": failures, "rewritten": rewritten}

