"""Registry model and alias name rules, shared by config validation, the registry and the CLI.

Both kinds of name become one S3 key component and, in the promote flow, part of a run
directory, so they follow the one path guard (``opd.paths.check_name``) with the registry's
64-character limit; the message says which kind of name was refused.
"""
from opd.errors import PermanentError
from opd.paths import UnsafePathError, check_name

NAME_MAX = 64


class BadRef(PermanentError, ValueError):
    """A ref that is not MODEL, MODEL:N or MODEL@ALIAS."""


def _validate(name: object, kind: str) -> str:
    try:
        return check_name(name, f"{kind} name", NAME_MAX)
    except UnsafePathError:
        shown = repr(name) if not isinstance(name, str) or len(name) <= 80 else repr(name[:80]) + "..."
        raise UnsafePathError(f"{kind} name {shown} is invalid: use 1-{NAME_MAX} characters from [A-Za-z0-9._-], "
                              "starting with a letter or digit, without '..' or '/'") from None


def validate_model_name(name: object) -> str:
    """``name`` if it is a valid model name, else UnsafePathError (a permanent ValueError)."""
    return _validate(name, "model")


def validate_alias_name(alias: object) -> str:
    """``alias`` if it is a valid alias name (``production``, ``candidate``), else UnsafePathError."""
    return _validate(alias, "alias")


def split_ref(ref: str) -> tuple[str, str | None, int | None]:
    """'MODEL' | 'MODEL@alias' | 'MODEL:version' -> (model, alias, version); BadRef or UnsafePathError (both
    permanent ValueErrors) naming what is wrong otherwise."""
    alias = version = None
    if "@" in ref:
        model, alias = ref.split("@", 1)
        validate_alias_name(alias)
    elif ":" in ref:
        model, v = ref.rsplit(":", 1)
        if not (v.isascii() and v.isdigit()) or int(v) < 1:
            raise BadRef(f"bad version in {ref!r}: use MODEL:N with N >= 1")
        version = int(v)
    else:
        model = ref
    validate_model_name(model)
    return model, alias, version
