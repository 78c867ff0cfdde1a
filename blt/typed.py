"""Typed, range-checked values: the one check every config field and every command or API option
goes through. A value's range sits in its annotation (`Annotated[float, Range(gt=0)]`, the
aliases below); `coerce` checks a value against an annotation (type, then range; every float
finite), `build` makes a dataclass from a dict of such values, naming an unknown key,
`check_option` checks one option outside the config, and `check_fields` checks a verb's options,
a dataclass of such fields (ServeOptions, PrepareOptions), as the config's are checked.

    lr = coerce("3e-4", PosFloat, "optimizer.lr")          # 0.0003; ConfigError naming the key if not
    cfg = build(Config, {"training": {"steps": 10}})      # nested dataclasses, field by field
    check_option("top_p", 1.5, Annotated[float, Range(gt=0, le=1)])   # OptionError: top_p must be in (0, 1]
    opts = check_fields(from_args(ServeOptions, args), flag=True)     # OptionError: --max-batch must be >= 1
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from blt.errors import ConfigError, UserError

_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class OptionError(UserError):
    """A bad argument to a command or an API call (not a config key), e.g. generate's top_p."""


@dataclass(frozen=True)
class Range:
    """Bounds a number must meet (None = unbounded): `Annotated[float, Range(gt=0)]`."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    says: str | None = None  # the rule in a message's words instead of the bounds (a non-finite value too)

    def __contains__(self, v) -> bool:
        return (
            (self.gt is None or v > self.gt)
            and (self.ge is None or v >= self.ge)
            and (self.lt is None or v < self.lt)
            and (self.le is None or v <= self.le)
        )

    def __str__(self) -> str:  # "> 0", ">= 1", "in [0, 1)", "in [0, 2**32)"
        if self.says:
            return self.says

        def num(b):
            return f"2**{b.bit_length() - 1}" if isinstance(b, int) and b >= 2**16 and not b & (b - 1) else str(b)

        lo = f"[{num(self.ge)}" if self.ge is not None else f"({num(self.gt)}" if self.gt is not None else ""
        hi = f"{num(self.le)}]" if self.le is not None else f"{num(self.lt)})" if self.lt is not None else ""
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return {"[": ">= ", "(": "> "}[lo[0]] + lo[1:]
        return {"]": "<= ", ")": "< "}[hi[-1]] + hi[:-1] if hi else "any number"


PosInt = Annotated[int, Range(ge=1)]
NonNegInt = Annotated[int, Range(ge=0)]
PosFloat = Annotated[float, Range(gt=0)]
NonNegFloat = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, lt=1)]  # dropout, val_fraction, AdamW betas
Seed = Annotated[int, Range(ge=0, lt=2**32)]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    """repr(value), cut to one short line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _OutOfRange(ConfigError):
    """The value has the right type but not an allowed value; a Union reports it as is."""

    def __init__(self, who: str, rule: str, value: Any):
        super().__init__(f"{who} must be {rule}, got {_show(value)}")
        self.who, self.rule, self.value = who, rule, value


def coerce(value: Any, tp: Any, key: str, subject: str = "config key '{}'") -> Any:
    """Check `value` against annotation `tp` (type, then Range; floats must be finite); returns
    the value (ints accepted for floats). Messages start with subject.format(key)."""
    origin, who = typing.get_origin(tp), subject.format(key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{who} must be a mapping of {tp.__name__} fields, got {_show(value)}")
        return build(tp, value, key + ".")
    if origin is Annotated:
        base, *rules = typing.get_args(tp)
        try:
            value = coerce(value, base, key, subject)
        except _OutOfRange:  # nan, inf: a rule that says its words says them for these too
            said = [str(r) for r in rules if isinstance(r, Range) and r.says]
            if not said:
                raise
            raise _OutOfRange(who, said[0], value) from None
        for rule in rules:
            if isinstance(rule, Range) and value not in rule:
                raise _OutOfRange(who, str(rule), value)
        return value
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(tp)
        for arm in arms:
            try:
                return coerce(value, arm, key, subject)
            except _OutOfRange as e:  # the right type but a wrong value: say which values are allowed
                nullable = e.who == who and type(None) in arms
                raise _OutOfRange(e.who, e.rule + (" or null" if nullable else ""), e.value) from None
            except ConfigError:
                pass
        raise ConfigError(f"{who} must be {_type_name(tp)}, got {_show(value)}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{who} must be one of {_type_name(tp)}, got {_show(value)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{who} must be {_type_name(tp)}, got {_show(value)}")
        (item,) = typing.get_args(tp)
        return [coerce(v, item, f"{key}[{i}]", subject) for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            number = value  # "3e-4": a float in YAML 1.2, a string to PyYAML's YAML 1.1
        if number is not None:
            try:
                number = float(number)
            except OverflowError:  # an int too large for a float
                number = math.inf
            if not math.isfinite(number):
                raise _OutOfRange(who, "a finite number", value)
            return number
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -(2**63) <= value < 2**63:
                raise _OutOfRange(who, "a 64-bit integer", value)
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    else:  # pragma: no cover - every annotation above is covered
        raise TypeError(f"unsupported annotation {tp} for {key}")
    raise ConfigError(f"{who} must be {_type_name(tp)}, got {_show(value)}")


def check_option(name: str, value: Any, tp: Any, optional: bool = False, flag: bool = False) -> Any:
    """An argument outside the config (a generate or eval option) checked as a config field is,
    against annotation `tp` (e.g. PosInt; None passes when optional); raises OptionError naming
    `name` as Python spells it (top_p) or, with flag=True, as the command line does (--top-p)."""
    if optional and value is None:
        return None
    try:
        return coerce(value, tp, "--" + name.replace("_", "-") if flag else name, subject="{}")
    except ConfigError as e:
        raise OptionError(str(e)) from None


def _without_none(tp: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None`, so that a message says X's rule alone; (tp, False) otherwise."""
    arms = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()
    if len(arms) == 2 and type(None) in arms:
        return next(a for a in arms if a is not type(None)), True
    return tp, False


def check_field(cls: type, name: str, value: Any, flag: bool = False) -> Any:
    """`value` checked against the annotation of field `name` of the dataclass `cls`, as
    check_option checks it (None passes where the annotation allows it)."""
    tp, optional = _without_none(typing.get_type_hints(cls, include_extras=True)[name])
    return check_option(name, value, tp, optional=optional, flag=flag)


def check_fields(options: Any, flag: bool = False) -> Any:
    """A copy of the options dataclass `options` with every field checked in order (check_field);
    an OptionError names the first bad one as Python spells it or, flag=True, as the CLI does."""
    cls = type(options)
    checked = {f.name: check_field(cls, f.name, getattr(options, f.name), flag) for f in dataclasses.fields(cls)}
    return dataclasses.replace(options, **checked)


def from_args(cls: type, args: Any) -> Any:
    """The options dataclass `cls` from an argparse namespace. A flag the command line left out
    (its parser declares it with default=argparse.SUPPRESS) keeps the field's default, so the
    dataclass holds the one set of defaults."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)  # keeps each field's Range
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{prefix}{k}'{hint}")
        kwargs[k] = coerce(v, hints[k], prefix + k)
    obj = cls()
    for k, v in kwargs.items():
        default = getattr(obj, k)
        if dataclasses.is_dataclass(default) and dataclasses.is_dataclass(v):
            # merge nested sections field by field so YAML can set only some of them
            for f in dataclasses.fields(v):
                if f.name in values[k]:
                    setattr(default, f.name, getattr(v, f.name))
        else:
            setattr(obj, k, v)
    return obj
