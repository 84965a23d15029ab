"""Strict dataclass fields: the one type check for config values read from a file or a command line.

Both config loaders use it: ModelConfig.from_dict (minillm_config.json, config.py) and the
TrainConfig overrides from TOML, JSON and flags (training/config.py). A field's type comes from its
annotation, resolved by typing.get_type_hints (under `from __future__ import annotations` an
annotation is the string "int | None", not a type), and a value must have exactly that type:

    int            3 ok; True, 3.0 and "3" are errors (bool is a subclass of int, so the test is
                   exact)
    float          3.5 ok; 3 is widened to 3.0 (JSON and TOML write 10000.0 as 10000)
    bool, str      exact
    list[str]      a list whose items are all str
    dict[str, float]  an object of str keys whose values are each a float (ints widened)
    X | None       None, or a value of type X

Range and cross-field checks (a positive dim, heads dividing it) stay with each dataclass's
__post_init__.
"""

from __future__ import annotations

import functools
import types
import typing
from typing import Any


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """{field name: resolved type} of a dataclass."""
    return typing.get_type_hints(cls)


def check_value(key: str, value: Any, tp: Any, source: str) -> Any:
    """`value` if it has type `tp` (an int widened to float where a float is expected); otherwise a
    TypeError naming where it came from and the key:
    "run.toml: batch_size must be int, found str '4'"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return check_value(key, value, tp, source)
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, args[0]) for v in value):
            raise TypeError(f"{source}: {key} must be a list of {args[0].__name__}, "
                            f"found {value!r}")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, args[0]) for k in value):
            raise TypeError(f"{source}: {key} must be an object, found {value!r}")
        return {k: check_value(f"{key}.{k}", v, args[1], source) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not tp:  # exact: True is not an int here, 3 is not a str
        raise TypeError(f"{source}: {key} must be {tp.__name__}, "
                        f"found {type(value).__name__} {value!r}")
    return value
