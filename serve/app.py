"""The Serve application: a FastAPI ingress in front of the autoscaled generator deployment.

    serve run serve/config.yaml
    serve run serve.app:build_app bundle=runs/demo/bundle max_replicas=2

The ingress is light (parsing, auth, PNG base64, the url store) and runs as one replica; the
generator holds the model, scales with load, and is reached through a DeploymentHandle, whose
queue bound (max_queued_requests) turns overload into 429s instead of unbounded waiting.
See serve/api.py for the HTTP contract and its errors.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types at runtime.
import asyncio
import base64
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response

from serve.api import ApiError, Limits, check_content_type, error_body, generation_kwargs, parse_request
from serve.args import AppArgs, parse_args
from serve.generator import ImageGeneratorDeployment
from serve.images import ImageStore

log = logging.getLogger("ray.serve")

PAGE = (Path(__file__).parent / "index.html").read_text()

# No /docs or /redoc: they load Swagger/ReDoc from a CDN, and this server works offline.
api = FastAPI(title="tessera", docs_url=None, redoc_url=None)

_STATUS_CODES = {404: "not_found", 405: "method_not_allowed"}


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and wrong methods answer in the same shape as every other error.
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(error_body(message, type="invalid_request_error",
                                   code=_STATUS_CODES.get(exc.status_code)),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not something the client did: logged with its traceback, answered in OpenAI's shape.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body("The server had an error while processing your request.",
                                   type="server_error"),
                        status_code=500)


@serve.deployment(name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                  # Requests wait here for the generator; the limit that matters is the generator's.
                  max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    def __init__(self, generator: DeploymentHandle, args: AppArgs, limits: Limits):
        self.generator, self.args, self.limits = generator, args, limits
        self.store = ImageStore(max_bytes=int(args.url_store_mb * 2**20), ttl_s=args.url_ttl_s)
        self.keys = [k.encode() for k in args.api_keys]
        self.created = int(time.time())

    def _authorize(self, request: Request) -> None:
        if not self.keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        given = token.strip().encode("utf-8", "surrogateescape")
        # Compare against every key in constant time, so timing does not reveal a prefix.
        if not any([hmac.compare_digest(given, k) for k in self.keys]):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.args.max_body_bytes
        too_large = ApiError(413, f"The request body is larger than {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()):
                raise ApiError(400, "Content-Length is not a number", code="invalid_request")
            if int(declared) > limit:
                raise too_large
        # Also bounded while reading: a chunked body declares no length.
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    @api.post("/v1/images/generations")
    async def generations(self, request: Request) -> JSONResponse:
        self._authorize(request)
        check_content_type(request.headers.get("content-type"))
        req = parse_request(await self._read_body(request), self.limits)
        # The generator re-checks the parameters with the sampling library (its refusal is a 400
        # too); the ingress stays free of torch.
        fields = generation_kwargs(req)
        t0 = time.perf_counter()
        pngs = await self._generate(req.prompt, fields)
        log.info("generated n=%d in %.2f s (user=%r)", len(pngs), time.perf_counter() - t0,
                 None if req.user is None else req.user[:100])
        if req.response_format == "url":
            base = self.args.public_url or str(request.base_url).rstrip("/")
            data = [{"url": f"{base}/v1/images/files/{self.store.put(png)}.png"} for png in pngs]
        else:
            data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in pngs]
        return JSONResponse({"created": int(time.time()), "data": data})

    async def _generate(self, prompt: str, fields: dict[str, Any]) -> list[bytes]:
        response = self.generator.generate.remote((prompt, fields))

        async def result() -> dict[str, Any]:
            return await response

        try:
            out = await asyncio.wait_for(result(), timeout=self.args.request_timeout_s)
        except BackPressureError:
            raise ApiError(429, "The server is at capacity (generation queue full); retry shortly.",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(503, f"Generation did not finish within {self.args.request_timeout_s:g} s; "
                                "the server is overloaded, retry later or ask for fewer images.",
                           type="server_error", code="timeout", headers={"Retry-After": "5"}) from None
        except DeploymentUnavailableError:
            raise ApiError(503, "The image generator is not available right now; retry later.",
                           type="server_error", code="unavailable", headers={"Retry-After": "5"}) from None
        if "error" in out:
            raise _param_error(out["error"], fields)
        return out["images"]

    @api.get("/v1/images/files/{name}")
    async def image_file(self, name: str) -> Response:
        png = self.store.get(name.removesuffix(".png")) if name.endswith(".png") else None
        if png is None:
            raise ApiError(404, f"No image {name[:100]!r}: it never existed or it expired", code="not_found")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model()]})

    @api.get("/v1/models/{model}")
    async def retrieve_model(self, model: str, request: Request) -> JSONResponse:
        self._authorize(request)
        if model != self.limits.model_name:
            raise ApiError(404, f"The model '{model[:100]}' does not exist", param="model",
                           code="model_not_found")
        return JSONResponse(self._model())

    def _model(self) -> dict[str, Any]:
        return {"id": self.limits.model_name, "object": "model", "created": self.created,
                "owned_by": "tessera"}

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.limits.model_name,
                             "resolution": self.limits.resolution})

    @api.get("/")
    async def page(self, request: Request) -> HTMLResponse:
        config = {"root": request.scope.get("root_path", "").rstrip("/"), "model": self.limits.model_name,
                  "resolution": self.limits.resolution, "max_n": self.limits.max_n,
                  "max_prompt_chars": self.limits.max_prompt_chars, "auth": bool(self.keys)}
        # "</" cannot appear in the JSON, so the <script> cannot be closed from inside it.
        blob = json.dumps(config).replace("</", "<\\/")
        return HTMLResponse(PAGE.replace("__TESSERA_CONFIG__", blob),
                            headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                     "style-src 'unsafe-inline'; script-src 'unsafe-inline'"})


def _param_error(message: str, fields: dict[str, Any]) -> ApiError:
    # The library's messages start with the field at fault ("top_p: must be in (0, 1] ...").
    head = message.split(":", 1)[0]
    return ApiError(400, message, param=head if head in fields else None, code="invalid_value")


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for `serve run` / `serve deploy` / `serve.run`; `args` as in serve.args.AppArgs."""
    from tessera import storage
    from tessera.bundle import read_manifest

    a = parse_args(args)
    # A relative path means the directory `serve run` was started in, not a Ray worker's.
    a = a.model_copy(update={"bundle": storage.absolute(a.bundle)})
    # Read the manifest here so a wrong URI fails the deploy with its name, before any replica
    # starts; it also tells the ingress the model's name and resolution.
    manifest = read_manifest(a.bundle)
    limits = Limits(model_name=manifest["name"], resolution=int(manifest["resolution"]),
                    has_reranker=bool(manifest.get("has_reranker")), max_prompt_chars=a.max_prompt_chars,
                    max_n=a.max_n, max_candidates=a.max_candidates)
    generator = ImageGeneratorDeployment.options(
        ray_actor_options={"num_cpus": a.num_cpus, "num_gpus": a.num_gpus},
        autoscaling_config=a.autoscaling_config(),
        max_ongoing_requests=a.max_ongoing_requests,
        max_queued_requests=a.max_queued_requests,
    ).bind(a.bundle, device=a.device, num_cpus=a.num_cpus, max_batch_size=a.max_batch_size,
           batch_wait_timeout_s=a.batch_wait_timeout_s, max_candidates=a.max_candidates)
    return Ingress.bind(generator, a, limits)
