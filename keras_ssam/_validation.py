"""Argument checks shared by the public classes: each error names the
argument and the value it received."""

import math
import numbers


def check_number(name, value, *, minimum, maximum=None, allow_equal=True, allow_none=False):
    """A finite real (not a bool) >= `minimum` (> when not `allow_equal`),
    and <= `maximum` if given."""
    if value is None and allow_none:
        return
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= minimum if allow_equal else value > minimum)
        and (maximum is None or value <= maximum)
    )
    if not ok:
        bound = f">= {minimum}" if allow_equal else f"> {minimum}"
        if maximum is not None:
            bound += f" and <= {maximum}"
        extra = " or None" if allow_none else ""
        raise ValueError(
            f"Argument `{name}` must be a finite number {bound}{extra}. "
            f"Received: {name}={value!r}"
        )


def check_int(name, value, minimum):
    """An integer (not a bool) >= `minimum`."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(
            f"Argument `{name}` must be an integer >= {minimum}. "
            f"Received: {name}={value!r}"
        )


def check_bool(name, value):
    """A bool (not 0/1 or another truthy value)."""
    if not isinstance(value, bool):
        raise ValueError(f"Argument `{name}` must be a bool. Received: {name}={value!r}")
