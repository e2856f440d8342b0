"""Language models' chat templates: Jinja in a sandbox, as transformers renders them.

A template comes with the model, so a broken one is the model's fault, found when it is compiled (by the
build, and by the server when it loads the version, which then is reported and not served); one that fails on
the messages a client sent is that request's error, whatever the template raised.
"""

from __future__ import annotations

import json
from typing import Any

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from shipyard.errors import InvalidInputError, ModelLoadError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    """transformers' `tojson` for chat templates: plain JSON (Jinja's own escapes <, > and & for HTML)."""
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def compile_template(source: str, where: str) -> Template:
    """The template compiled; ModelLoadError naming `where` when it does not compile (Jinja's syntax errors,
    and what its constant folding raises at compile time, such as `10 ** 5000`)."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise_template_error
    environment.filters["tojson"] = _tojson
    try:
        return environment.from_string(source)
    except Exception as exc:  # any error of the template's own making
        raise ModelLoadError(f"{where}: the chat template does not compile: {_first_line(exc)}") from None


def render(template: Template, context: dict[str, Any]) -> str:
    """The template rendered; InvalidInputError (param `messages`) whatever it raises on these messages."""
    try:
        return str(template.render(**context))
    except TemplateError as exc:
        raise InvalidInputError(f"the chat template refused the messages: {exc}", param="messages") from None
    except Exception as exc:  # 1/0, str + int, recursion: the template failed on this input
        raise InvalidInputError(f"the chat template failed on the messages: {_first_line(exc)}",
                                param="messages") from None  # fmt: skip
