"""One registry per family of variants: attention kernels, memories, rotary scaling rules,
KV-cache policies, synthetic tasks, suite tasks, classifier aggregators.

A ``Registry`` maps names to variants (classes, or functions for task generators). It refuses a
name registered twice, lists its names, answers an unknown name with the accepted ones and the
closest match, and builds a variant from its signature:

- ``build(name, config, **settings)``: ``settings`` are given on purpose, so one the variant does
  not take is refused (a misspelt setting must not fall back to its default unnoticed);
  ``config`` is a pool such as a whole ``ModelConfig`` as a dict, from which the variant takes
  only the values its signature names, so one config serves every variant of a family.
- Defaults live in the variant's signature; ``default(setting)`` reads them for the config, and
  refuses two variants of a family that disagree on what a shared setting defaults to.
- A variant may check its settings in a class method ``check`` whose parameters are settings (its
  ``__init__`` calls it); ``check(name, config)`` runs it without building the variant, which
  would allocate parameters or import optional packages.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

T = TypeVar("T", bound=Callable[..., Any])

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


class SettingError(ValueError):
    """A setting value a variant cannot take: names the variant, the setting, the value and what
    is accepted, so callers (the config) can restate it in their own terms."""

    def __init__(self, variant: str, setting: str, value: Any, accepted: str) -> None:
        super().__init__(f"{variant}: {setting}={value!r} is invalid: expected {accepted}")
        self.variant, self.setting, self.value, self.accepted = variant, setting, value, accepted


def check_int(variant: str, setting: str, value: Any, least: int) -> None:
    """Refuse anything but an integer >= ``least`` (a bool is not a count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        accepted = "an integer > 0" if least == 1 else f"an integer >= {least}"
        raise SettingError(variant, setting, value, accepted)


def check_choice(variant: str, setting: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SettingError(variant, setting, value, "one of " + ", ".join(map(repr, choices)))


class Registry(Mapping[str, T]):
    """Named variants of one family (``kind`` names it in messages, e.g. "attention")."""

    def __init__(self, kind: str, noun: str = "setting") -> None:
        self.kind, self.noun = kind, noun
        self._entries: dict[str, T] = {}
        self._signatures: dict[str, dict[str, inspect.Parameter]] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make ``entry`` buildable by ``name``; a class also gets ``name`` set."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            if isinstance(entry, type):
                entry.name = name  # type: ignore[attr-defined]
            return entry

        return add

    # --- the mapping: registration order, like a dict -----------------------------------------
    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def accepted(self, wrong: str | None = None) -> str:
        """'one of a, b, c', plus a did-you-mean for ``wrong`` when a name is close to it."""
        text = "one of " + ", ".join(self.names())
        close = difflib.get_close_matches(wrong, self._entries, n=1) if wrong else []
        return text + (f" (did you mean {close[0]!r}?)" if close else "")

    def lookup(self, name: str) -> T:
        """The variant registered as ``name``, or a ValueError with the names it could be."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}: expected {self.accepted(name)}")
        return self._entries[name]

    # --- settings -----------------------------------------------------------------------------
    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        """The settings the variant's signature names (``*args``/``**kwargs`` included)."""
        if name not in self._signatures:
            self._signatures[name] = dict(inspect.signature(self.lookup(name)).parameters)
        return self._signatures[name]

    def takes(self, name: str) -> tuple[str, ...]:
        """The named settings of variant ``name``, in signature order."""
        return tuple(p for p, v in self.parameters(name).items() if v.kind not in _VARIADIC)

    def users(self, setting: str) -> list[str]:
        """The variants that take ``setting``, sorted."""
        return [n for n in self.names() if setting in self.takes(n)]

    def default(self, setting: str) -> Any:
        """The default the variants taking ``setting`` declare (they must agree on one)."""
        found = {
            n: self.parameters(n)[setting].default
            for n in self.users(setting)
            if self.parameters(n)[setting].default is not inspect.Parameter.empty
        }
        values = list(found.values())
        if not values:
            raise ValueError(f"no {self.kind} declares a default for {setting!r}")
        if any(v != values[0] for v in values):
            raise ValueError(f"{self.kind} variants disagree on the default of {setting}: {found}")
        return values[0]

    def check_names(self, name: str, settings: Iterable[str]) -> None:
        """Refuse the ``settings`` variant ``name`` does not take (any, if it takes ``**``)."""
        params = self.parameters(name)
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return
        unknown = sorted(set(settings) - set(params))
        if unknown:
            close = {u: difflib.get_close_matches(u, params, n=1) for u in unknown}
            hints = "".join(f" (did you mean {c[0]!r} for {u!r}?)" for u, c in close.items() if c)
            raise ValueError(
                f"{self.kind} {name!r} takes no {self.noun} {', '.join(unknown)}{hints}; "
                f"it takes: {', '.join(self.takes(name)) or 'none'}"
            )

    def resolve(
        self, name: str, config: Mapping[str, Any] | None = None, /, **settings: Any
    ) -> dict[str, Any]:
        """The values variant ``name`` would be built with: those of ``config`` it names, then
        ``settings``; a setting it does not take is refused, one it needs and lacks too."""
        params = self.parameters(name)
        self.check_names(name, settings)
        values = {k: v for k, v in (config or {}).items() if k in params}
        values.update(settings)
        missing = [
            p
            for p, v in params.items()
            if v.kind not in _VARIADIC and v.default is inspect.Parameter.empty and p not in values
        ]
        if missing:
            raise ValueError(f"{self.kind} {name!r} needs {self.noun} {', '.join(missing)}")
        return values

    def build(self, name: str, config: Mapping[str, Any] | None = None, /, **settings: Any) -> Any:
        """Variant ``name`` called with ``resolve``'s values: an instance, for a class."""
        return self.lookup(name)(**self.resolve(name, config, **settings))

    def check(self, name: str, config: Mapping[str, Any] | None = None, /, **settings: Any) -> None:
        """Run variant ``name``'s ``check`` on the values it would be built with (defaults
        included), without building it; a variant without ``check`` accepts any value."""
        values = self.resolve(name, config, **settings)
        hook = getattr(self.lookup(name), "check", None)
        if hook is None:
            return
        params = self.parameters(name)
        full = {p: values.get(p, v.default) for p, v in params.items() if v.kind not in _VARIADIC}
        wanted = inspect.signature(hook).parameters
        hook(**{k: v for k, v in full.items() if k in wanted})
