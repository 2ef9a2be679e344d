"""What every shim uses: the marker on installed objects, stand-in modules, and a journal of
changes so that :func:`upstream.compat.uninstall_shims` can put the process back as it was."""
from __future__ import annotations

import importlib.machinery
import sys
import types
from typing import Callable, List

#: Marker attribute set on every object the shims install.
MARK = "_mam_clap_shim"

_MISSING = object()
#: Undo actions of the changes made so far, oldest first.
_UNDO: List[Callable[[], None]] = []


def mark(obj):
    setattr(obj, MARK, True)
    return obj


def stand_in_module(name: str, doc: str) -> types.ModuleType:
    """A marked module object with a spec (so ``importlib.util.find_spec(name)`` works)."""
    mod = types.ModuleType(name, doc)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    return mark(mod)


def set_attr(obj, name: str, value) -> None:
    """``setattr(obj, name, value)``, undone by restoring the previous value (or deleting it)."""
    namespace = vars(obj) if isinstance(obj, types.ModuleType) else None
    old = namespace.get(name, _MISSING) if namespace is not None else getattr(obj, name, _MISSING)
    setattr(obj, name, value)

    def undo():
        if old is _MISSING:
            if name in vars(obj):
                delattr(obj, name)
        else:
            setattr(obj, name, old)

    _UNDO.append(undo)


def set_module(name: str, module: types.ModuleType) -> None:
    """``sys.modules[name] = module``, undone by restoring the previous entry (or removing it)."""
    old = sys.modules.get(name, _MISSING)
    sys.modules[name] = module

    def undo():
        if old is _MISSING:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = old

    _UNDO.append(undo)


def on_undo(action: Callable[[], None]) -> None:
    """Record an undo action for a change made another way."""
    _UNDO.append(action)


def journal_length() -> int:
    return len(_UNDO)


def undo_to(length: int = 0) -> None:
    """Undo the changes recorded after the first ``length`` ones, newest first."""
    while len(_UNDO) > length:
        _UNDO.pop()()
