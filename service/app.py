"""`create_app(settings)`: the FastAPI app, its lifespan (which builds the Runtime) and error mapping."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__
from service.api import demo, guards, oip
from service.api.routes import router
from service.errors import ServiceError
from service.pipeline import Pipeline
from service.runtime import Runtime
from service.settings import Settings

log = logging.getLogger(__name__)


def error_response(exc: ServiceError) -> JSONResponse:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return JSONResponse(exc.body(), status_code=exc.http_status, headers=headers)


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    """Build the app. The Runtime is built in the lifespan unless one is injected (tests, gRPC sharing)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = runtime or await asyncio.to_thread(Runtime, settings)
        app.state.runtime = rt
        app.state.pipeline = Pipeline(rt)
        # Calibrate in the background: /healthz answers at once, /readyz turns 200 when calibrated.
        starter = asyncio.create_task(rt.start(), name="segserve-calibration")
        app.state.starter = starter
        app.state.start_failed = None

        def report(task: asyncio.Task) -> None:
            # A server that cannot calibrate must not sit unready for ever: say why and let the process exit.
            if task.cancelled() or task.exception() is None:
                return
            app.state.start_failed = task.exception()
            log.critical("start-up failed: %s: %s", type(task.exception()).__name__, task.exception(),
                         exc_info=task.exception())
            stop = getattr(app.state, "on_start_failure", None)
            if stop is not None:
                stop()

        starter.add_done_callback(report)
        try:
            yield
        finally:
            if not starter.done():
                starter.cancel()
            await rt.close()

    app = FastAPI(
        title="segserve",
        version=__version__,
        description="Semantic segmentation with a per-request latency budget: for each request the server picks the "
        "operating point (model x compute knob x input scale) with the best quality that meets the budget under the "
        "current load.",
        lifespan=lifespan,
        docs_url=None, redoc_url=None,  # served by service.api.demo from local files: the CDN default is blank offline
    )
    app.include_router(router)
    app.include_router(oip.router)
    app.include_router(demo.router)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def framework_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # The framework's own 404 (no route) and 405 (wrong method) in the one documented error shape.
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404:
            message = f"no route {request.url.path}; see /docs"
        return JSONResponse({"error": {"code": codes.get(exc.status_code, "http_error"), "message": message}},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request"
        return JSONResponse({"error": {"code": "invalid_parameter", "message": message}}, status_code=422)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):  # type: ignore[no-untyped-def]
        try:
            response = await call_next(request)
        except Exception:
            log.exception("unhandled error on %s", request.url.path)
            response = JSONResponse({"error": {"code": "internal", "message": "internal server error"}},
                                    status_code=500)
        route = request.scope.get("route")
        rt: Runtime | None = getattr(request.app.state, "runtime", None)
        if rt is not None:
            path = getattr(route, "path", "unmatched")
            # The model that answered (from the receipt), else the one asked for; "" for a pool request no model
            # answered (a refusal or a bad input).
            model = response.headers.get("x-segserve-model") or request.path_params.get("model", "")
            rt.metrics.requests.labels(path, str(response.status_code), model).inc()
        return response

    guards.install(app, settings)  # API keys, rate limit, CORS, ops port: outside the rest (refusals cost nothing)
    return app
