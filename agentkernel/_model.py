"""A very small declarative model layer (standard library only).

The spec is on the CLI's hot path, and a validation framework costs 10-80 ms of import time there
(measured: msgspec ~12 ms, pydantic ~70 ms, dataclasses ~16 ms on our machines). These few classes
give typed fields, defaults, range and choice checks, unknown-key rejection with the known keys named,
and stable JSON-able dicts; the HTTP layer converts its pydantic request bodies into these.
"""

from __future__ import annotations

from .errors import ValidationError

TYPE_CHECKING = False  # typing costs ~2 ms at start-up; annotations here are never evaluated
if TYPE_CHECKING:
    from typing import Any

_MISSING = object()


class Field:
    """One field. ``kind`` is int, float, bool, str, strlist, strdict, or a Model subclass."""

    __slots__ = ("check", "choices", "default", "doc", "kind", "max", "min", "name", "optional")

    def __init__(
        self,
        kind: Any,
        default: Any = _MISSING,
        *,
        optional: bool = False,
        choices: tuple[str, ...] | None = None,
        min: float | None = None,
        max: float | None = None,
        check: Any = None,
        doc: str = "",
    ) -> None:
        self.kind = kind
        self.default = default
        self.optional = optional
        self.choices = choices
        self.min = min
        self.max = max
        self.check = check
        self.doc = doc
        self.name = ""

    def convert(self, value: Any, where: str) -> Any:
        label = f"{where}.{self.name}" if where else self.name
        if value is None:
            if self.optional:
                return None
            raise ValidationError(f"{label} must be set (got null)")
        kind = self.kind
        if isinstance(kind, type) and issubclass(kind, Model):
            if isinstance(value, kind):
                return value
            if not isinstance(value, dict):
                raise ValidationError(f"{label} must be a table/object, got {type(value).__name__}")
            return kind.from_dict(value, where=label)
        if kind == "bool":
            if not isinstance(value, bool):
                raise ValidationError(f"{label} must be true or false, got {value!r}")
        elif kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValidationError(f"{label} must be an integer, got {value!r}")
        elif kind == "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValidationError(f"{label} must be a number, got {value!r}")
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValidationError(f"{label} must be a finite number, got {value!r}")
        elif kind == "str":
            if not isinstance(value, str):
                raise ValidationError(f"{label} must be a string, got {value!r}")
        elif kind == "strlist":
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ValidationError(f"{label} must be a list of strings, got {value!r}")
            value = tuple(value)
        elif kind == "strdict":
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise ValidationError(f"{label} must be a table of strings, got {value!r}")
            value = dict(value)
        if self.choices is not None and value not in self.choices:
            raise ValidationError(f"{label} must be one of {', '.join(self.choices)}; got {value!r}")
        if self.min is not None and value < self.min:
            raise ValidationError(f"{label} must be at least {self.min:g}, got {value!r}")
        if self.max is not None and value > self.max:
            raise ValidationError(f"{label} must be at most {self.max:g}, got {value!r}")
        if self.check is not None:
            self.check(value, label)
        return value


class _ModelMeta(type):
    def __new__(mcs, name, bases, ns):
        fields = []
        for base in bases:
            fields.extend(getattr(base, "_fields", ()))
        for key, val in list(ns.items()):
            if isinstance(val, Field):
                val.name = key
                fields.append(val)
                del ns[key]
        ns["_fields"] = tuple(fields)
        inherited = {g.name for b in bases for g in getattr(b, "_fields", ())}
        ns["__slots__"] = tuple(f.name for f in fields if f.name not in inherited)
        return super().__new__(mcs, name, bases, ns)


class Model(metaclass=_ModelMeta):
    """Immutable-by-convention record with validation. Use ``replace`` to derive a changed copy."""

    _fields: tuple[Field, ...] = ()

    def __init__(self, **values: Any) -> None:
        self._load(values, type(self).__name__)

    def _load(self, values: dict[str, Any], where: str) -> None:
        known = {f.name for f in self._fields}
        unknown = [k for k in values if k not in known]
        if unknown:
            raise ValidationError(
                f"unknown key {unknown[0]!r} in {where} (known keys: {', '.join(sorted(known))})"
            )
        for f in self._fields:
            if f.name in values:
                value = f.convert(values[f.name], where)
            elif f.default is _MISSING:
                raise ValidationError(f"{where}.{f.name} is required")
            else:
                d = f.default
                value = d() if callable(d) else d
            object.__setattr__(self, f.name, value)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | None = None) -> Any:
        """Build from a plain dict; ``where`` names the source in error messages (e.g. "[resources]")."""
        label = where or cls.__name__
        if not isinstance(data, dict):
            raise ValidationError(f"{label} must be an object, got {type(data).__name__}")
        obj = cls.__new__(cls)
        obj._load(data, label)
        return obj

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in self._fields:
            v = getattr(self, f.name)
            if isinstance(v, Model):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, dict):
                v = dict(sorted(v.items()))
            out[f.name] = v
        return out

    def replace(self, **changes: Any) -> Any:
        data = {f.name: getattr(self, f.name) for f in self._fields}
        data.update(changes)
        return type(self)(**data)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; use replace()")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash(repr(self.to_dict()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in self._fields)
        return f"{type(self).__name__}({inner})"


_ENV_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


def is_env_name(s: str) -> bool:
    """An environment variable name (letters, digits, underscore; not starting with a digit). Here, not in
    spec.py, so that the egress rules and secrets can check names without importing the spec module."""
    return bool(s) and s[0] not in "0123456789" and set(s) <= _ENV_CHARS
