"""A bad parameter value, phrased for whoever passed it.

The Python API names its parameters (``epochs=0: expected an integer >= 1``); the command names
its flags (``--epochs=0: expected an integer >= 1``). A ``ParameterError`` keeps the names and
values out of the sentence, so ``str()`` gives the Python wording and ``as_flags()`` the
command-line one (cli.py uses it).
"""
from __future__ import annotations

import json
from typing import Any

#: a parameter named without its value ("dataset is required")
NAME_ONLY: Any = object()


def flag_text(value: Any) -> str:
    """A value as it would be typed after ``--flag=``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def escape_braces(text: str) -> str:
    """Literal text inside a ParameterError template."""
    return text.replace("{", "{{").replace("}", "}}")


class ParameterError(ValueError):
    """``template`` names each parameter as ``{name}``; ``values`` gives its value (or
    ``NAME_ONLY``). Literal braces in the template are doubled, as in ``str.format``."""

    def __init__(self, template: str, **values: Any) -> None:
        self.template = template
        self.values = values
        super().__init__(self.phrase(flags=False))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.values)

    def phrase(self, flags: bool) -> str:
        def one(name: str, value: Any) -> str:
            if flags:
                return f"--{name}" if value is NAME_ONLY else f"--{name}={flag_text(value)}"
            return name if value is NAME_ONLY else f"{name}={value!r}"

        return self.template.format(**{k: one(k, v) for k, v in self.values.items()})

    def as_flags(self) -> str:
        return self.phrase(flags=True)
