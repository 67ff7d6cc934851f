"""What can go wrong with a request, once, for every dialect: a kind, a sentence, the field.

Each dialect turns a `ServeError` into its own shape and status code (TGI's
`{"error", "error_type"}`, the Inference API's `{"error"}`, OpenAI's `{"error": {"message", "type",
"param", "code"}}`); the table below holds the status codes, so that the same mistake gets the
status each API documents for it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

# kind -> status code in each dialect (TGI, the Inference API, OpenAI).
STATUS = {
    "validation": {"tgi": 422, "hf": 400, "openai": 400},
    "not_found": {"tgi": 404, "hf": 404, "openai": 404},
    "unauthorized": {"tgi": 401, "hf": 401, "openai": 401},
    "too_large": {"tgi": 413, "hf": 413, "openai": 413},
    "overloaded": {"tgi": 429, "hf": 429, "openai": 429},
    "loading": {"tgi": 503, "hf": 503, "openai": 503},
    "generation": {"tgi": 424, "hf": 500, "openai": 500},
    "timeout": {"tgi": 424, "hf": 504, "openai": 504},
}
# TGI's error_type for each kind (its clients raise a typed exception from it).
TGI_ERROR_TYPES = {"validation": "validation", "overloaded": "overloaded", "generation": "generation",
                   "timeout": "generation", "not_found": "validation", "unauthorized": "unauthorized",
                   "too_large": "validation", "loading": "loading"}
# OpenAI's (type, code) for each kind.
OPENAI_ERROR_TYPES = {
    "validation": ("invalid_request_error", None),
    "not_found": ("invalid_request_error", "model_not_found"),
    "unauthorized": ("invalid_request_error", "invalid_api_key"),
    "too_large": ("invalid_request_error", "request_too_large"),
    "overloaded": ("rate_limit_error", "rate_limit_exceeded"),
    "loading": ("server_error", "model_loading"),
    "generation": ("server_error", None),
    "timeout": ("server_error", "timeout"),
}


class ServeError(Exception):
    """A request the server cannot answer as asked: `kind` (a key of STATUS), one sentence, and the
    request field it is about (`param`, e.g. "parameters.temperature"), if any."""

    def __init__(self, kind: str, message: str, param: str | None = None, code: str | None = None,
                 estimated_time: float | None = None) -> None:
        assert kind in STATUS, kind
        super().__init__(message)
        self.kind, self.message, self.param, self.code = kind, message, param, code
        self.estimated_time = estimated_time  # seconds until a loading model is ready

    def status(self, dialect: str) -> int:
        return STATUS[self.kind][dialect]

    def body(self, dialect: str) -> dict[str, Any]:
        """The JSON body of this error in `dialect` ("tgi", "hf" or "openai")."""
        if dialect == "openai":
            kind_type, kind_code = OPENAI_ERROR_TYPES[self.kind]
            return {"error": {"message": self.message, "type": kind_type, "param": self.param,
                              "code": self.code or kind_code}}
        body: dict[str, Any] = {"error": self.message}
        if dialect == "tgi":
            body["error_type"] = TGI_ERROR_TYPES[self.kind]
        if self.estimated_time is not None:
            body["estimated_time"] = round(self.estimated_time, 1)
        return body


def parse_body(raw: bytes, model: type[M], where: str = "") -> M:
    """Validate a JSON request body against `model`, or raise a validation ServeError naming the
    first field that is wrong (`where` prefixes the field names, e.g. "parameters.")."""
    try:
        return model.model_validate_json(raw or b"")
    except ValidationError as e:
        raise validation_error(e, where) from None


def validation_error(error: ValidationError, where: str = "") -> ServeError:
    """One ServeError from pydantic's errors: the first field that is wrong, and what it should be
    (a field that may take several types lists what each would need, joined by "or")."""
    errors = error.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return ServeError("validation", f"The request body is not valid JSON ({first['msg']}); send a JSON "
                                        "object.")
    if first["type"] in ("model_type", "model_attributes_type") and not first["loc"]:
        return ServeError("validation", "The request body must be a JSON object.")
    param = _field_name(first["loc"], where)
    same_field = [e for e in errors if _field_name(e["loc"], where) == param]
    if first["type"] == "missing":
        return ServeError("validation", f"`{param}` is required but missing.", param=param)
    if len(same_field) > 1:
        wanted = " or ".join(dict.fromkeys(e["msg"].removeprefix("Input should be ") for e in same_field))
        message = f"`{param}` should be {wanted}"
    else:
        message = f"`{param}`: {first['msg']}"
    given = first.get("input")
    if isinstance(given, (int, float, str, bool)) and len(repr(given)) <= 40:
        message += f" (given: {given!r})"
    return ServeError("validation", message.rstrip(".") + ".", param=param)


def _field_name(loc: tuple[Any, ...], where: str) -> str:
    """A pydantic error location as a field path ("parameters.stop[1]"); the tags pydantic adds
    for the members of a union ("str", "list[str]", "function-after[...]") are left out."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
            continue
        if item in ("str", "int", "float", "bool", "none") or "[" in item:
            continue
        parts.append(item)
    return where + ".".join(parts) if parts else where.rstrip(".") or "body"
