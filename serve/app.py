"""The Serve application: a FastAPI ingress in front of the autoscaled generator deployment.

    serve run serve/config.yaml
    serve run serve.app:build_app bundle=runs/demo/bundle max_replicas=2

The ingress is light (parsing, auth, PNG base64, the url store) and runs as one replica; the
generator holds the model, scales with load, and is reached through a DeploymentHandle, whose
queue bound (max_queued_requests) turns overload into 429s instead of unbounded waiting. The one
ingress replica also counts each caller's requests in flight (max_requests_per_client), so one
caller cannot fill that queue for all.

It fails closed: without API keys the ingress refuses to start when Serve's HTTP proxy listens on
a non-loopback address (unless allow_anonymous), and every generator replica checks it loads the
bundle the application was built with (serve/generator.py).
See serve/api.py for the HTTP contract and its errors.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures' types at runtime.
import asyncio
import base64
import functools
import hmac
import html
import json
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers, MutableHeaders, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import HTMLResponse, JSONResponse, Response

from serve.api import (
    ApiError,
    Limits,
    Upload,
    check_content_type,
    check_multipart,
    error_body,
    generation_kwargs,
    parse_edit_form,
    parse_request,
)
from serve.args import AppArgs, auth_state, host_allowed, parse_args
from serve.generator import ImageGeneratorDeployment, manifest_digest
from serve.images import ImageStore
from tessera.sampling.priming import load_image  # PIL only: the ingress stays free of torch

log = logging.getLogger("ray.serve")

PAGE = (Path(__file__).parent / "index.html").read_text()
APP_JS = (Path(__file__).parent / "app.js").read_text()
# The page runs /app.js only (same origin, never inline), so an injected <script> cannot run; its
# config travels in a non-executable JSON block. It may not be framed (clickjacking).
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'unsafe-inline'; img-src 'self' data:; "
            "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# Latency buckets (s): a light request takes ~0.1 s on a CPU, a heavy one minutes under load.
LATENCY_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]

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


class _Guard:
    """ASGI middleware ahead of every route (those added later too): a Host header outside
    allowed_hosts is refused (DNS rebinding: a page of another site that resolves its own name to
    this server), and no response may be content-sniffed into another type."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_nosniff(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Content-Type-Options"] = "nosniff"
            await send(message)

        ingress = serve.get_replica_context().servable_object
        host = Headers(scope=scope).get("host")
        if not host_allowed(host, ingress.args.allowed_hosts):
            error = ApiError(400, f"This server does not answer to the host {(host or '')[:100]!r} "
                                  "(its allowed_hosts argument)", code="host_not_allowed")
            return await error.response()(scope, receive, send_nosniff)
        await self.app(scope, receive, send_nosniff)


# Before @serve.ingress below, which freezes a copy of `api`.
api.add_middleware(_Guard)


def _admitted(route: str):
    """Decorator of a generation route: authorization, the caller's limit on requests in flight,
    and the latency metric by outcome (ok, or the error's code)."""

    def decorate(handler):
        @functools.wraps(handler)
        async def run(self, request: Request):
            t0, outcome = time.perf_counter(), "error"
            try:
                # Without keys a caller is its address (as uvicorn reports it: X-Forwarded-For
                # only from a proxy on this host).
                caller = self._authorize(request) or f"address {getattr(request.client, 'host', '?')}"
                if self.in_flight.get(caller, 0) >= self.args.max_requests_per_client:
                    raise ApiError(429, f"Too many requests in flight from you (the limit is "
                                        f"{self.args.max_requests_per_client} per caller); retry when one "
                                        "has finished.", type="rate_limit_error",
                                   code="too_many_requests_in_flight", headers={"Retry-After": "1"})
                self.in_flight[caller] = self.in_flight.get(caller, 0) + 1
                try:
                    response = await handler(self, request)
                finally:
                    self.in_flight[caller] -= 1
                    if not self.in_flight[caller]:
                        del self.in_flight[caller]
                outcome = "ok"
                return response
            except ApiError as e:
                outcome = e.code or str(e.status)
                raise
            finally:
                self.latency.observe(time.perf_counter() - t0, tags={"route": route, "outcome": outcome})

        return run

    return decorate


@serve.deployment(name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                  # Requests wait here for the generator; the limit that matters is the generator's.
                  max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    def __init__(self, generator: DeploymentHandle, args: AppArgs, limits: Limits, bundle_sha256: str = "",
                 card: dict | None = None):
        from ray.serve.metrics import Gauge, Histogram

        # Where Serve's HTTP proxy listens is its http_options (serve.start, the config YAML), not an
        # argument of this app: ask the controller, so the check sees what the proxy really binds.
        # Serve has no public call for it; tests/test_serve_auth.py holds this one to the pinned Ray.
        http_host = serve.context._get_global_client().http_config.host
        try:
            state = auth_state(args, http_host)
        except ValueError as e:
            log.error("%s", e)
            raise
        log.info("tessera auth: %s; Host headers answered: %s", state, ", ".join(args.allowed_hosts))
        self.generator, self.args, self.limits = generator, args, limits
        self.bundle_sha256 = bundle_sha256
        self.card = card
        self.store = ImageStore(max_bytes=int(args.url_store_mb * 2**20), ttl_s=args.url_ttl_s)
        self.keys = [k.encode() for k in args.api_keys]
        self.created = int(time.time())
        self.in_flight: dict[str, int] = {}  # caller -> generation requests admitted, not yet answered
        self.waiting = 0  # requests sent to the generator, not yet answered
        self.queue_depth = Gauge("tessera_queue_depth",
                                 description="generation requests waiting for or running on the generator")
        self.latency = Histogram("tessera_request_latency_s",
                                 description="generation request latency by outcome",
                                 boundaries=LATENCY_BOUNDARIES, tag_keys=("route", "outcome"))

    def _authorize(self, request: Request) -> str | None:
        """The caller's identity ("key <index>") when keys are set, else None; 401 without a valid key."""
        if not self.keys:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        given = token.strip().encode("utf-8", "surrogateescape")
        # Compare against every key in constant time, so timing does not reveal a prefix.
        matches = [hmac.compare_digest(given, k) for k in self.keys]
        if not any(matches):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return f"key {matches.index(True)}"

    async def _read_body(self, request: Request, limit: int | None = None) -> bytes:
        limit = limit or self.args.max_body_bytes
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
    @_admitted("generations")
    async def generations(self, request: Request) -> JSONResponse:
        check_content_type(request.headers.get("content-type"))
        req = parse_request(await self._read_body(request), self.limits)
        # The generator re-checks the parameters with the sampling library (its refusal is a 400
        # too); the ingress stays free of torch.
        fields = generation_kwargs(req)
        t0 = time.perf_counter()
        pngs = await self._generate(req.prompt, fields)
        log.info("generated n=%d in %.2f s (user=%r)", len(pngs), time.perf_counter() - t0,
                 None if req.user is None else req.user[:100])
        return self._images_response(request, req.response_format, pngs)

    @api.post("/v1/images/edits")
    @_admitted("edits")
    async def edits(self, request: Request) -> JSONResponse:
        # Multipart, as OpenAI's images.edit sends it: the JSON-only rule of generations is not this route's.
        check_multipart(request.headers.get("content-type"))
        # The text fields beside the image get max_body_bytes of room.
        body = await self._read_body(request, self.args.max_image_bytes + self.args.max_body_bytes)
        items = await self._form_items(request.headers, body)
        req, data = parse_edit_form(items, self.limits, max_image_bytes=self.args.max_image_bytes)
        try:
            # Decoding is CPU work: off the event loop. A bad upload fails here, before it queues.
            image = await asyncio.to_thread(load_image, data, self.limits.resolution)
        except ValueError as e:
            raise ApiError(400, str(e), param="image", code="invalid_image") from None
        fields = {**generation_kwargs(req), "image": image}
        if req.keep_rows is not None:
            fields["keep_rows"] = req.keep_rows
        t0 = time.perf_counter()
        pngs = await self._generate(req.prompt, fields)
        log.info("edited n=%d in %.2f s (user=%r)", len(pngs), time.perf_counter() - t0,
                 None if req.user is None else req.user[:100])
        return self._images_response(request, req.response_format, pngs)

    async def _form_items(self, headers: Headers, body: bytes) -> list[tuple[str, str | Upload]]:
        async def stream():
            yield body

        parser = MultiPartParser(headers, stream(), max_files=4, max_fields=64,
                                 max_part_size=self.args.max_body_bytes)
        parser.spool_max_size = len(body)  # the body is in memory already: keep the file parts there
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise ApiError(400, f"The multipart body could not be parsed: {e.message}",
                           code="invalid_multipart") from None
        items: list[tuple[str, str | Upload]] = []
        for name, value in form.multi_items():
            items.append((name, Upload(value.filename, await value.read()) if isinstance(value, UploadFile)
                          else value))
        await form.close()
        return items

    def _images_response(self, request: Request, response_format: str | None,
                         pngs: list[bytes]) -> JSONResponse:
        if response_format == "url":
            base = self.args.public_url or str(request.base_url).rstrip("/")
            data = [{"url": f"{base}/v1/images/files/{self.store.put(png)}.png"} for png in pngs]
        else:
            data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in pngs]
        return JSONResponse({"created": int(time.time()), "data": data})

    async def _generate(self, prompt: str, fields: dict[str, Any]) -> list[bytes]:
        response = self.generator.generate.remote((prompt, fields))

        async def result() -> dict[str, Any]:
            return await response

        self.waiting += 1
        self.queue_depth.set(self.waiting)
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
        finally:
            self.waiting -= 1
            self.queue_depth.set(self.waiting)
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
        # OpenAI's model object, plus the bundle's model card summary (tessera.model_card.summary).
        return JSONResponse({**self._model(), "card": self.card})

    def _model(self) -> dict[str, Any]:
        return {"id": self.limits.model_name, "object": "model", "created": self.created,
                "owned_by": "tessera"}

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": self.limits.model_name,
                             "resolution": self.limits.resolution, "bundle_sha256": self.bundle_sha256})

    @api.get("/")
    async def page(self, request: Request) -> HTMLResponse:
        config = {"root": request.scope.get("root_path", "").rstrip("/"), "model": self.limits.model_name,
                  "resolution": self.limits.resolution, "max_n": self.limits.max_n,
                  "max_prompt_chars": self.limits.max_prompt_chars, "auth": bool(self.keys),
                  "grid": self.limits.grid}
        # No "<" in the JSON (\u003c is the same string to JSON.parse), so nothing in it can close
        # the JSON block or start markup.
        blob = json.dumps(config).replace("<", "\\u003c")
        page = PAGE.replace("__TESSERA_CONFIG__", blob).replace("__TESSERA_ROOT__",
                                                                 html.escape(config["root"]))
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP})

    @api.get("/app.js")
    async def page_script(self) -> Response:
        return Response(APP_JS, media_type="text/javascript", headers={"Cache-Control": "no-cache"})


def _param_error(message: str, fields: dict[str, Any]) -> ApiError:
    # The library's messages start with the field at fault ("top_p: must be in (0, 1] ...").
    head = message.split(":", 1)[0]
    return ApiError(400, message, param=head if head in fields else None, code="invalid_value")


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for `serve run` / `serve deploy` / `serve.run`; `args` as in serve.args.AppArgs."""
    from tessera import model_card, storage
    from tessera.bundle import read_manifest

    a = parse_args(args)
    # A relative path means the directory `serve run` was started in, not a Ray worker's.
    a = a.model_copy(update={"bundle": storage.absolute(a.bundle)})
    # Read the manifest here so a wrong URI fails the deploy with its name, before any replica
    # starts; it also tells the ingress the model's name and resolution.
    manifest = read_manifest(a.bundle)
    # Every generator replica, the ones autoscaling adds later too, must load exactly this bundle.
    pinned = manifest_digest(manifest)
    limits = Limits(model_name=manifest["name"], resolution=int(manifest["resolution"]),
                    has_reranker=bool(manifest.get("has_reranker")), max_prompt_chars=a.max_prompt_chars,
                    max_n=a.max_n, max_candidates=a.max_candidates,
                    grid=int(manifest["parts"]["prior"]["shape"]["grid"]))
    generator = ImageGeneratorDeployment.options(
        ray_actor_options={"num_cpus": a.num_cpus, "num_gpus": a.num_gpus},
        autoscaling_config=a.autoscaling_config(),
        max_ongoing_requests=a.max_ongoing_requests,
        max_queued_requests=a.max_queued_requests,
    ).bind(a.bundle, manifest_sha256=pinned, device=a.device, num_cpus=a.num_cpus,
           max_batch_size=a.max_batch_size, batch_wait_timeout_s=a.batch_wait_timeout_s,
           max_candidates=a.max_candidates)
    # The model card's summary for GET /v1/models/{id}, read once from the pinned bundle.
    try:
        card = model_card.summary(a.bundle)
    except Exception as e:  # informational only: the bundle itself was read above
        log.warning("%s: no model card summary (%s)", a.bundle, e)
        card = None
    return Ingress.bind(generator, a, limits, pinned, card)
