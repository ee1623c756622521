"""Temporary replacements that undo themselves: a function bound on one instance (a model's
``get_video_features``, a merger's ``forward``, ``get_rope_index``) or an entry of a mapping
(transformers' attention functions). Several may stack; each ``remove()`` puts back what it
found, unless something else has been put there since (then that one's own ``remove()`` will)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable


class InstanceOverride:
    """Binds ``fn`` as ``obj.name`` on that instance only (the class's method stays)."""

    def __init__(self, obj: Any, name: str, fn: Callable):
        self.obj, self.name, self.fn = obj, name, fn
        self.previous = obj.__dict__.get(name)  # another override bound there before, else None
        setattr(obj, name, fn)

    def remove(self) -> None:
        if self.obj.__dict__.get(self.name) is not self.fn:
            return
        if self.previous is not None:
            setattr(self.obj, self.name, self.previous)
        else:
            delattr(self.obj, self.name)


class MappingOverride:
    """Sets ``mapping[key] = fn``. For transformers' ``GeneralInterface`` mappings that is a
    local entry over the library-wide one, which shows again once the entry is deleted."""

    def __init__(self, mapping: Any, key: str, fn: Callable):
        self.mapping, self.key, self.fn = mapping, key, fn
        self.previous = getattr(mapping, "_local_mapping", {}).get(key)
        mapping[key] = fn

    def remove(self) -> None:
        if self.mapping.get(self.key) is not self.fn:
            return
        if self.previous is not None:
            self.mapping[self.key] = self.previous
        else:
            del self.mapping[self.key]


@contextlib.contextmanager
def overriding(obj: Any, name: str, fn: Callable):
    """``InstanceOverride`` for the duration of a ``with`` block."""
    override = InstanceOverride(obj, name, fn)
    try:
        yield
    finally:
        override.remove()
