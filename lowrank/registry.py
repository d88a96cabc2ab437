"""Name -> class registries for the extension points (initializer, preconditioner, adapter, chain, and the
statistics a data-driven initializer's pass collects).

Modelled on timm's registry: entries are registered where they are defined, listed with
wildcards, and looked up by name (case-insensitively: ``"LoRA_GA"`` finds ``lora_ga``). Differences: a duplicate
name is an error (unless ``override=True``), and an unknown name raises a ``KeyError`` that
suggests the closest names and says how to list them all.

Third-party packages register through the entry-point group ``lowrank.plugins``: each entry
point names a module (importing it runs its ``@register_*`` decorators) or a callable (called
with no arguments). Plugins load lazily, on the first lookup or listing of any registry once ``import lowrank``
has finished (never during it, so a plug-in may import anything from ``lowrank``); a plug-in that fails warns
with its name and error and is retried by :func:`load_plugins`.

The built-in packages (``lowrank.init``, ``lowrank.adapters``, ...) register their modules with
:func:`import_package`; while ``lowrank`` itself is importing, those imports wait until its top-level names are
bound, so a module dropped into ``lowrank/init/`` may write ``from lowrank import InitResult``.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from types import MappingProxyType
from typing import Any, Callable, Mapping, TypeVar

T = TypeVar("T")

PLUGIN_GROUP = "lowrank.plugins"
_ready = False  # set when ``import lowrank`` has finished (``_lowrank_imported``); plug-ins load only after
_plugins_loaded = False  # every entry point has been tried once (the automatic load runs once)
_loaded: set[str] = set()  # entry points imported successfully
_failed: dict[str, str] = {}  # entry point -> its error, until load_plugins() imports it
_deferred: list[tuple[str, list[str]]] = []  # built-in packages waiting for lowrank's import to finish


def _entry_name(ep) -> str:
    return f"{ep.name} ({ep.value})"


def load_plugins() -> dict[str, str]:
    """Import the ``lowrank.plugins`` entry points not imported yet, retrying the ones that failed (e.g. after
    fixing or installing what they lacked). Returns ``{"name (module)": error}`` for those that still fail; each
    failure also warns with the plug-in's name and error. Lookups and listings call this once by themselves."""
    global _plugins_loaded
    _plugins_loaded = True  # set first: a plug-in that looks something up while loading must not recurse
    for ep in metadata.entry_points(group=PLUGIN_GROUP):
        key = _entry_name(ep)
        if key in _loaded:
            continue
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type):
                obj()
        except Exception as exc:  # noqa: BLE001 - report and go on, the built-ins still work
            _failed[key] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"lowrank plugin {ep.name!r} ({ep.value}) failed to load: {exc!r}; fix it, then call "
                          "lowrank.load_plugins() to retry", stacklevel=3)
        else:
            _loaded.add(key)
            _failed.pop(key, None)
    return dict(_failed)


def _load_plugins() -> None:
    """The automatic load: once, and only after ``import lowrank`` has finished."""
    if _ready and not _plugins_loaded:
        load_plugins()


def _lowrank_imported() -> None:
    """Called last by ``lowrank/__init__.py``: import the built-in packages' modules (their top-level names are
    bound now), then let plug-ins load on the next lookup."""
    global _ready
    while _deferred:
        _import_all(*_deferred.pop(0))
    _ready = True


@dataclass(frozen=True)
class Entry:
    """One registered object: its name, description (the first line of its docstring) and capabilities (what
    its class declares, e.g. ``uses_data`` or ``adapter_kinds``; ``Registry.list`` filters on them)."""

    name: str
    obj: Any
    description: str
    capabilities: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


class Registry:
    """A named collection of classes of one kind (``"initializer"``, ``"preconditioner"``, ``"adapter"``).

    ``capabilities(cls) -> dict`` (optional) reads what a registered class declares, once, at registration."""

    def __init__(self, kind: str, capabilities: Callable[[Any], Mapping[str, Any]] | None = None):
        self.kind = kind
        self._capabilities = capabilities
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, obj: T | None = None, *, override: bool = False) -> Any:
        """Register ``obj`` under ``name``; used bare (``register(name, obj)``) or as a decorator."""
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ValueError(f"invalid {self.kind} name {name!r}: use a non-empty string without surrounding spaces")

        def decorator(o: T) -> T:
            clash = [n for n in self._entries if n != name and n.casefold() == name.casefold()]
            if clash:  # lookups ignore case: "Foo" beside "foo" would make every other spelling ambiguous
                raise ValueError(f"{self.kind} {name!r} differs from the registered {clash[0]!r} only in case; "
                                 "names are looked up case-insensitively: pick another name")
            if name in self._entries and not override:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (by {self._entries[name].obj!r}); "
                    f"pick another name or pass override=True to replace it"
                )
            doc = (getattr(o, "__doc__", None) or "").strip().splitlines()
            caps = MappingProxyType(dict(self._capabilities(o))) if self._capabilities else MappingProxyType({})
            self._entries[name] = Entry(name, o, doc[0] if doc else "", caps)
            if isinstance(o, type) and "registry_name" not in vars(o):  # an alias keeps the first name
                o.registry_name = name  # type: ignore[attr-defined]
            return o

        return decorator if obj is None else decorator(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests and interactive work)."""
        del self._entries[self.canonical(name)]

    def get(self, name: str) -> Any:
        """The object registered as ``name``; ``KeyError`` with suggestions when unknown."""
        _load_plugins()
        try:
            return self._entries[name].obj
        except (KeyError, TypeError):
            pass
        folded = [n for n in self._entries if isinstance(name, str) and n.casefold() == name.casefold()]
        if len(folded) == 1:  # names match case-insensitively ("LoRA_GA" is "lora_ga")
            return self._entries[folded[0]].obj
        close = difflib.get_close_matches(str(name), list(self._entries), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        failed = (f"; plug-ins that failed to load: {', '.join(f'{k}: {e}' for k, e in _failed.items())} (fix them, then "
                  "call lowrank.load_plugins())") if _failed else ""
        raise KeyError(
            f"unknown {self.kind} {name!r}; {hint}(see lowrank.list_{self.kind}s() for all "
            f"{len(self._entries)} registered){failed}"
        ) from None

    def canonical(self, name: str) -> str:
        """The registered spelling of ``name`` (lookups are case-insensitive); ``KeyError`` when unknown."""
        obj = self.get(name)
        return name if name in self._entries else next(n for n, e in self._entries.items() if e.obj is obj
                                                       and n.casefold() == name.casefold())

    def entry(self, name: str) -> Entry:
        return self._entries[self.canonical(name)]

    def list(self, pattern: str = "*", exclude: str | None = None, **where: Any) -> list[str]:
        """Sorted names matching the shell-style ``pattern``, not matching ``exclude``, and whose capabilities
        match every ``where`` filter (``uses_data=True``; for a tuple capability such as ``adapter_kinds``, the
        singular key names a member: ``adapter_kind="factors"``)."""
        _load_plugins()
        names = [n for n in self._entries if fnmatch.fnmatchcase(n, pattern)]
        if exclude is not None:
            names = [n for n in names if not fnmatch.fnmatchcase(n, exclude)]
        if where:
            known = {k for e in self._entries.values() for k in e.capabilities}
            known |= {k[:-1] for k in known if k.endswith("s")}
            bad = sorted(set(where) - known)
            if bad:
                raise ValueError(f"unknown {self.kind} capability filter(s) {bad}; filter on {sorted(known)}")
            names = [n for n in names if all(_has(self._entries[n].capabilities, k, v) for k, v in where.items())]
        return sorted(names)

    def table(self) -> str:
        """A markdown table of every entry: name, description, what it declares (``TABLE_COLUMNS``) and its
        options with their defaults. The docs' method tables (docs/initializers.md, ...) are this output (a test
        keeps them in sync)."""
        _load_plugins()
        cols = TABLE_COLUMNS.get(self.kind, ())
        lines = ["| name | method | " + " | ".join(label for _, label in cols) + (" | " if cols else "") + "options |",
                 "|---|---|" + "---|" * len(cols) + "---|"]
        for name in self.list():
            e = self._entries[name]
            cells = [_cell(e.capabilities.get(key), key) for key, _ in cols]
            lines.append(f"| `{name}` | {e.description.replace('|', chr(92) + '|')} | " + " | ".join(cells)
                         + (" | " if cells else "") + f"{_options(getattr(e.obj, 'Options', None))} |")
        return "\n".join(lines)

    def __contains__(self, name: object) -> bool:
        _load_plugins()
        return name in self._entries or (isinstance(name, str)
                                         and sum(n.casefold() == name.casefold() for n in self._entries) == 1)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"


TABLE_COLUMNS = {"initializer": (("uses_data", "data"), ("adapter_kinds", "adapters"), ("allocates_ranks", "ranks"),
                                 ("offset", "offset")),
                 "preconditioner": (("stateful", "state"),), "adapter": (("kind", "kind"),),
                 "chain": (("freezes_factors", "freezes factors"),)}


def _cell(value: Any, key: str = "") -> str:
    if key == "offset" and value is None:
        return "varies"  # declared per instance (options) or per layer
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, tuple):
        return ", ".join(map(str, value))
    return "" if value is None else str(value)


def _options(options: Any) -> str:
    """Own options with defaults; options inherited from a shared base (e.g. ``GradientOptions``) by its name."""
    if not dataclasses.is_dataclass(options):
        return "none"
    bases = [b for b in options.__mro__[1:] if dataclasses.is_dataclass(b) and dataclasses.fields(b)]
    inherited = {f.name for f in dataclasses.fields(bases[0])} if bases else set()
    own = [f"`{f.name}={_default(f)}`" for f in dataclasses.fields(options) if f.name not in inherited]
    return ", ".join(own + ([f"+ `{bases[0].__name__}`"] if bases else [])) or "none"


def _default(f) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def _has(caps: Mapping[str, Any], key: str, value: Any) -> bool:
    if key in caps:
        return caps[key] == value
    return value in caps.get(key + "s", ())  # adapter_kind="factors" -> "factors" in adapter_kinds


def _initializer_caps(cls) -> dict[str, Any]:
    """``allocates_ranks``: it can choose per-layer ranks (it derives from ``lowrank.init.RankAllocation``: under
    ``rank_budget``, or by its own options, e.g. EVA with ``rho > 1``)."""
    options = getattr(cls, "Options", None)
    return {"uses_data": bool(getattr(cls, "uses_data", False)), "adapter_kinds": tuple(getattr(cls, "adapter_kinds", ())),
            "allocates_ranks": callable(getattr(cls, "allocate", None)),  # init.RankAllocation's one required hook
            "preserves_output": bool(getattr(cls, "preserves_output", True)), "needs": tuple(getattr(cls, "needs", ())),
            "offset": getattr(cls, "offset", None), "frozen": tuple(getattr(cls, "frozen", ())),
            "options": tuple(f.name for f in dataclasses.fields(options)) if dataclasses.is_dataclass(options) else ()}


def _preconditioner_caps(cls) -> dict[str, Any]:
    # stateful: a class below the base (the last class that defines init_state) overrides init_state
    owners = [k for k in getattr(cls, "__mro__", ()) if "init_state" in vars(k)]
    return {"adapter_kinds": tuple(getattr(cls, "adapter_kinds", ())), "trains_A": bool(getattr(cls, "trains_A", True)),
            "stateful": len(owners) > 1}


def _adapter_caps(cls) -> dict[str, Any]:
    return {"kind": getattr(cls, "kind", None)}


def _chain_caps(cls) -> dict[str, Any]:
    return {"freezes_factors": bool(getattr(cls, "freezes_factors", False)),
            "reinit_first": bool(getattr(cls, "reinit_first", False))}


def _statistic_caps(cls) -> dict[str, Any]:
    return {"uses_backward": bool(getattr(cls, "uses_backward", False)), "provides": tuple(getattr(cls, "provides", ()))}


def import_package(name: str, path) -> None:
    """Import every module of package ``name`` (``path`` its ``__path__``), so that a new plug-in is one new
    file: its ``@register_*`` decorator runs without any list to edit. While ``import lowrank`` is still running
    the imports wait for its end (``_lowrank_imported``), so such a file may import from the top-level ``lowrank``."""
    if _ready:
        _import_all(name, list(path))
    else:
        _deferred.append((name, list(path)))


def _import_all(name: str, path: list[str]) -> None:
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        importlib.import_module(f"{name}.{info.name}")


INITIALIZERS = Registry("initializer", _initializer_caps)
PRECONDITIONERS = Registry("preconditioner", _preconditioner_caps)
ADAPTERS = Registry("adapter", _adapter_caps)
STATISTIC_REGISTRY = Registry("statistic", _statistic_caps)
CHAINS = Registry("chain", _chain_caps)


def _api(reg: Registry) -> tuple[Callable, Callable, Callable]:
    def register(name: str, obj: Any = None, *, override: bool = False) -> Any:
        return reg.register(name, obj, override=override)

    def get(name: str) -> Any:
        return reg.get(name)

    def list_(pattern: str = "*", exclude: str | None = None, **capabilities: Any) -> list[str]:
        return reg.list(pattern, exclude, **capabilities)

    for f, verb in ((register, "register"), (get, "get"), (list_, "list")):
        f.__name__ = f.__qualname__ = f"{verb}_{reg.kind}" + ("s" if verb == "list" else "")
        f.__doc__ = f"{verb.capitalize()} {reg.kind}s (see :class:`lowrank.registry.Registry`)."
    return register, get, list_


register_initializer, get_initializer, list_initializers = _api(INITIALIZERS)
register_preconditioner, get_preconditioner, list_preconditioners = _api(PRECONDITIONERS)
register_adapter, get_adapter, list_adapters = _api(ADAPTERS)
register_statistic, get_statistic, list_statistics = _api(STATISTIC_REGISTRY)
register_chain, get_chain, list_chains = _api(CHAINS)
