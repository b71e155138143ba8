"""The HTTP API's contract, kept free of Ray so it can be read and tested on its own.

POST /v1/images/generations follows the OpenAI Images API as its official clients send it. Every
error a client can cause is answered in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with these statuses:

  400 invalid_request_error  bad JSON, a body that is not an object, a wrong type, a value out of
                             range, an unknown field, a missing prompt. OpenAI answers all of
                             these with 400 (never 422), and so do we: its clients raise
                             BadRequestError for them. `param` names the field at fault. Also,
                             on any route, a Host header outside allowed_hosts (host_not_allowed).
  401 invalid_request_error  missing or wrong `Authorization: Bearer <key>` when keys are set
  404 invalid_request_error  unknown `model` (code model_not_found), route or image file
  405 invalid_request_error  wrong method on a known route
  413 invalid_request_error  body larger than max_body_bytes (checked before it is read in full)
  415 invalid_request_error  a Content-Type other than JSON, or none
  429 rate_limit_error       the caller already has max_requests_per_client requests in flight (code
                             too_many_requests_in_flight), or the generator's queue is full
                             (max_queued_requests, code queue_full); Retry-After set
  503 server_error           generation did not finish within request_timeout_s, or no replica is
                             available; Retry-After set

POST /v1/images/edits is OpenAI's edit call, multipart/form-data (`image` file, `prompt`, `n`, `size`,
`response_format`, ...) as its clients send it, answered like generations. tessera edits the DALL·E
paper's way: the image's top `keep_rows` token rows (a tessera field; default half the grid) are kept
and the rest drawn. `mask` is refused (400): there is no inpainting of arbitrary regions. A body
that is not multipart is a 415; an image over max_image_bytes a 413; one that is not a PNG, JPEG
or WebP image a 400 with param "image".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse

# OpenAI client fields that don't apply to this model, accepted with their standard values and
# ignored (PNG output is lossless, there is no moderation, quality/style have no counterpart).
IGNORED_FIELDS = ("quality", "style", "background", "moderation", "output_compression", "user",
                  "safety_identifier")
# tessera.sampling.generate.MAX_SEED (kept here so this module needs no torch; a test checks they agree).
MAX_SEED = 2**31 - 1
EXTENSION_FIELDS = ("seed", "temperature", "top_k", "top_p", "guidance_scale", "candidates")
# The edit call's file fields: `image` (or `image[]`, as clients send a list) is the picture to prime with.
IMAGE_FIELDS = ("image", "image[]")


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, type=self.type, param=self.param, code=self.code),
                            status_code=self.status, headers=self.headers)


def error_body(message: str, *, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_QUALITY = Literal["auto", "standard", "hd", "low", "medium", "high", "xhigh", "max"]


class ImageRequest(BaseModel):
    """The request body. Strict: "2" is not a number and true is not 1, as in OpenAI's API."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    model: str | None = None
    n: int | None = None
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    quality: _QUALITY | None = None
    style: Literal["vivid", "natural"] | None = None
    # Our images have no alpha channel: "transparent" is refused rather than silently ignored.
    background: Literal["auto", "opaque"] | None = None
    moderation: Literal["low", "auto"] | None = None
    output_format: Literal["png"] | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    stream: bool | None = None
    partial_images: int | None = Field(None, ge=0, le=0)
    # tessera's extensions.
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    temperature: float | None = Field(None, ge=0, le=10, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1, le=2**31 - 1)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    guidance_scale: float | None = Field(None, ge=0, le=100, allow_inf_nan=False)
    candidates: int | None = None


@dataclass(frozen=True)
class Limits:
    model_name: str
    resolution: int
    has_reranker: bool
    max_prompt_chars: int
    max_n: int
    max_candidates: int
    grid: int | None = None  # the prior's token grid (rows): bounds an edit's keep_rows

    @property
    def size(self) -> str:
        return f"{self.resolution}x{self.resolution}"


def check_content_type(value: str | None) -> None:
    # Required, not only checked when present: a page of another site can POST a body with no
    # Content-Type (a Blob) without a CORS preflight, but not one labelled application/json.
    if value is None:
        raise ApiError(415, "Content-Type is missing; send the body as JSON with "
                            "'Content-Type: application/json'", code="unsupported_media_type")
    mime = value.split(";", 1)[0].strip().lower()
    if mime != "application/json" and not (mime.startswith("application/") and mime.endswith("+json")):
        raise ApiError(415, f"Content-Type must be application/json, got {value[:100]!r}",
                       code="unsupported_media_type")


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON does not.
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> Any:
    if not body.strip():
        raise ApiError(400, "The request body is empty; send a JSON object with at least a prompt",
                       code="invalid_json")
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "The request body is nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise ApiError(400, f"The request body is not valid JSON: {str(e)[:200]}",
                       code="invalid_json") from None


def parse_request(body: bytes, limits: Limits) -> ImageRequest:
    """A validated request or an ApiError naming the field at fault."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise ApiError(400, f"The request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_type")
    req = _validate(ImageRequest, data)
    check_limits(req, limits)
    return req


def _validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"Unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter") from None
        if err["type"] == "missing":
            raise ApiError(400, f"Missing required parameter: {param}", param=param,
                           code="missing_required_parameter") from None
        raise ApiError(400, f"Invalid value for {param}: {err['msg']}", param=param,
                       code="invalid_value") from None


def _bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def check_limits(req: ImageRequest, limits: Limits) -> None:
    if not req.prompt.strip():
        raise _bad("prompt", "prompt must not be empty")
    try:
        req.prompt.encode("utf-8")
    except UnicodeEncodeError:
        # JSON can spell lone surrogates ("\\ud800"); the tokenizer cannot take them.
        raise _bad("prompt", "prompt is not valid Unicode (it contains a lone surrogate)") from None
    if len(req.prompt) > limits.max_prompt_chars:
        raise _bad("prompt", f"prompt is {len(req.prompt)} characters; "
                   f"the limit is {limits.max_prompt_chars}")
    if req.model is not None and req.model != limits.model_name:
        raise ApiError(404, f"The model '{req.model[:100]}' does not exist; "
                       f"this server serves '{limits.model_name}'",
                       param="model", code="model_not_found")
    n = 1 if req.n is None else req.n
    if not 1 <= n <= limits.max_n:
        raise _bad("n", f"n must be between 1 and {limits.max_n}, got {n}")
    if req.size not in (None, "auto", limits.size):
        raise _bad("size", f"size must be '{limits.size}' (this model's resolution), 'auto' or omitted, "
                           f"got {req.size[:40]!r}")
    if req.stream:
        raise _bad("stream", "streaming is not supported; omit stream or set it to false")
    if req.candidates is not None:
        if not limits.has_reranker:
            raise _bad("candidates", "this model has no reranker, so candidates cannot be used")
        if not n <= req.candidates <= limits.max_candidates:
            raise _bad("candidates", f"candidates must be between n ({n}) and {limits.max_candidates}, "
                                     f"got {req.candidates}")


def generation_kwargs(req: ImageRequest) -> dict[str, Any]:
    """The GenerationParams fields this request sets (unset ones keep the library's defaults)."""
    out: dict[str, Any] = {"n": 1 if req.n is None else req.n}
    for name in EXTENSION_FIELDS:
        value = getattr(req, name)
        if value is not None:
            out[name] = value
    return out


class EditRequest(ImageRequest):
    """The edit call's text fields. Form values are all strings, so parsing is lax ("2" is 2)."""

    model_config = ConfigDict(extra="forbid", strict=False)

    input_fidelity: Literal["high", "low"] | None = None
    keep_rows: int | None = Field(None, ge=1)  # tessera: token rows of the image kept


@dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes = field(repr=False)


def check_multipart(value: str | None) -> None:
    mime = (value or "").split(";", 1)[0].strip().lower()
    if mime != "multipart/form-data":
        raise ApiError(415, "Content-Type must be multipart/form-data (an `image` file and text fields, as "
                            f"OpenAI's images.edit sends them), got {(value or '')[:100]!r}",
                       code="unsupported_media_type")


def parse_edit_form(items: list[tuple[str, str | Upload]], limits: Limits, *,
                    max_image_bytes: int) -> tuple[EditRequest, bytes]:
    """A validated edit request and its image file's bytes, or an ApiError naming the field at fault.
    items: the form's (name, value) pairs in order, files as Upload."""
    if any(name == "mask" for name, _ in items):
        raise _bad("mask", "mask is not supported: tessera edits as the DALL·E paper primes, keeping the "
                           "image's top rows (the keep_rows field; default half) and drawing the rest. "
                           "Omit mask.", code="unsupported_parameter")
    images = [v for name, v in items if name in IMAGE_FIELDS]
    if not images:
        raise _bad("image", "Missing required parameter: image (a PNG, JPEG or WebP file)",
                   code="missing_required_parameter")
    if len(images) > 1:
        raise _bad("image", f"edits take one image, got {len(images)}")
    if not isinstance(images[0], Upload):
        raise _bad("image", "image must be a file upload (a multipart part with a filename), "
                            "not a text field")
    if len(images[0].data) > max_image_bytes:
        raise ApiError(413, f"image is {len(images[0].data)} bytes; the limit is {max_image_bytes}",
                       param="image", code="request_too_large")
    data: dict[str, Any] = {}
    for name, value in items:
        if name in IMAGE_FIELDS:
            continue
        if isinstance(value, Upload):
            raise _bad(name, f"{name} must be a text field, not a file")
        if name in data:
            raise _bad(name, f"{name} is given more than once")
        data[name] = value
    req = _validate(EditRequest, data)
    check_limits(req, limits)
    if req.keep_rows is not None and limits.grid is not None and req.keep_rows >= limits.grid:
        raise _bad("keep_rows", f"keep_rows must be between 1 and {limits.grid - 1} (this model's token "
                                f"grid has {limits.grid} rows), got {req.keep_rows}")
    return req, images[0].data
