"""Model-name rules shared by config validation and the registry."""
import re

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def validate_model_name(name: str) -> str:
    if not name or ".." in name or "/" in name or not _NAME.match(name):
        raise ValueError(
            f"model name {name!r} is invalid: use 1-64 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit, without '..' or '/'"
        )
    return name
