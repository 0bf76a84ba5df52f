"""Shared helpers for config files (big_vision style `file.py:arg1,key=value`)."""
from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses `smoke,layer=3` into a ConfigDict typed like `defaults`.

    A bare name sets a boolean default to True; `key=value` casts to the default's type.
    Unknown keys raise so a typo after `:` never passes silently.
    """
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    for item in arg.split(','):
        item = item.strip()
        if not item:
            continue
        key, _, value = item.partition('=')
        if key not in defaults:
            raise ValueError(f'unknown config arg {key!r}; valid: {sorted(defaults)}')
        default = defaults[key]
        if not value:
            if not isinstance(default, bool):
                raise ValueError(f'config arg {key!r} needs a value ({key}=...)')
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ('1', 'true', 'yes')
        else:
            out[key] = type(default)(value)
    return out
