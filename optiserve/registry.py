"""Plugin registries with auto-discovery: adding an optimizer, runtime or scenario is adding one file.

A plugin base class derives from :class:`Plugin`; every concrete subclass with a ``name`` registers
itself when its module is imported, and :meth:`Plugin.registry` imports every module of the base
class's package first, so nothing lists plugins by hand.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass
from typing import ClassVar, Self

from optiserve.errors import ConfigError, PluginUnavailable


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""


class Plugin:
    """Base of the three registries (Optimizer, Runtime, Scenario)."""

    name: ClassVar[str] = ""
    """Registry key, used on the command line and in manifests."""

    description: ClassVar[str] = ""
    """One line for `optiserve doctor` and `--help`."""

    requires: ClassVar[tuple[str, ...]] = ()
    """Importable packages this plugin needs; missing ones make it unavailable, with an install hint."""

    extra: ClassVar[str] = ""
    """The pip extra that installs ``requires`` (for the hint)."""

    needs_cuda: ClassVar[bool] = False
    """True when the plugin only runs on a CUDA GPU."""

    _plugins: ClassVar[dict[str, type[Plugin]]]
    _package: ClassVar[str]
    _discovered: ClassVar[bool]

    def __init_subclass__(cls, *, base: bool = False, package: str = "", **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if base:
            cls._plugins = {}
            cls._package = package
            cls._discovered = False
            return
        if cls.name:
            existing = cls._plugins.get(cls.name)
            if existing is not None and existing.__qualname__ != cls.__qualname__:
                raise TypeError(f"two plugins are named {cls.name!r}: {existing} and {cls}")
            cls._plugins[cls.name] = cls

    @classmethod
    def _discover(cls) -> None:
        if cls._discovered:
            return
        package = importlib.import_module(cls._package)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{cls._package}.{info.name}")
        cls._discovered = True

    @classmethod
    def registry(cls) -> dict[str, type[Self]]:
        cls._discover()
        return dict(sorted(cls._plugins.items()))  # type: ignore[arg-type]

    @classmethod
    def get(cls, name: str) -> type[Self]:
        plugins = cls.registry()
        if name not in plugins:
            kind = cls.__name__.lower()
            raise ConfigError(f"unknown {kind} {name!r}; known: {', '.join(plugins) or '(none)'}")
        return plugins[name]

    @classmethod
    def availability(cls) -> Availability:
        reasons = []
        if cls.needs_cuda:
            from optiserve.hardware import cuda_available

            ok, why = cuda_available()
            if not ok:
                reasons.append(f"needs a CUDA GPU ({why})")
        missing = [pkg for pkg in cls.requires if importlib.util.find_spec(pkg) is None]
        if missing:
            hint = (
                f"pip install 'optiserve[{cls.extra}]'" if cls.extra else f"pip install {' '.join(missing)}"
            )
            reasons.append(f"missing {', '.join(missing)}: {hint}")
        return Availability(not reasons, "; ".join(reasons))

    @classmethod
    def require_available(cls) -> None:
        avail = cls.availability()
        if not avail.ok:
            raise PluginUnavailable(f"{cls.name} is not available here: {avail.reason}")
