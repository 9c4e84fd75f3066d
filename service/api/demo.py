"""The browser demo page (`/demo`, with `/` redirecting to it) and the API docs served without a CDN.

The page is plain HTML, CSS and JavaScript from `service/static/` (no build step, nothing fetched from outside):
it calls the public API like any client (`/v1/models`, `/v1/segment`) plus `/demo/palette/{model}` for the
class colours, which `/v1/models` does not list.

`/docs` (Swagger UI) and `/redoc` load their scripts and styles from the `fastapi-offline` package's copy of
the swagger-ui-dist and redoc bundles (the package is MIT licensed, Swagger UI Apache-2.0, ReDoc MIT), served
under `/docs/static/`: a machine without internet gets the full page, not a blank one.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import PurePosixPath

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from service.errors import NotFound
from service.runtime import Runtime

router = APIRouter(include_in_schema=False)

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml",
}
DOCS_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
DOCS_STATIC = "/docs/static"
DEMO_STATIC = "/demo/static"
# The pages may load nothing from elsewhere: the browser enforces it. (ReDoc's sidebar links a logo on a CDN; blocked,
# ReDoc drops it.) Swagger UI and ReDoc start from inline scripts and styles; ReDoc's search runs in a blob: worker.
DEMO_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data: blob:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
            "base-uri 'none'; frame-ancestors 'none'")
# The page and its assets change with the installed version; revalidating is cheap next to a stale page.
NO_CACHE = {"Cache-Control": "no-cache"}
ASSET_CACHE = {"Cache-Control": "public, max-age=86400"}  # the docs bundles change only with the package


@cache
def demo_assets() -> dict[str, bytes]:
    """Every file of `service/static`, by name, read once (a fixed, small set: the only names ever served)."""
    folder = resources.files("service") / "static"
    return {entry.name: entry.read_bytes() for entry in folder.iterdir()
            if entry.is_file() and PurePosixPath(entry.name).suffix in MEDIA_TYPES}


@cache
def docs_asset(name: str) -> bytes:
    return (resources.files("fastapi_offline") / "static" / name).read_bytes()


def asset_response(name: str, content: bytes, headers: dict[str, str]) -> Response:
    return Response(content, media_type=MEDIA_TYPES[PurePosixPath(name).suffix], headers=headers)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/demo")


@router.get("/demo")
async def demo_page() -> Response:
    return asset_response("demo.html", demo_assets()["demo.html"], {**NO_CACHE, "Content-Security-Policy": DEMO_CSP})


@router.get(DEMO_STATIC + "/{name}")
async def demo_static(name: str) -> Response:
    assets = demo_assets()
    if name not in assets:  # a lookup in a fixed set: no path from the request ever reaches the file system
        raise NotFound(f"no demo asset named {name!r}", code="asset_not_found")
    return asset_response(name, assets[name], NO_CACHE)


@router.get("/demo/palette/{model}")
async def palette(model: str, request: Request) -> JSONResponse:
    """The class names and colours of a served model (one [r, g, b] per class id)."""
    runtime: Runtime = request.app.state.runtime
    served = runtime.models.get(model)
    if served is None:
        raise NotFound(f"model {model!r} is not served; GET /v1/models lists the served models",
                       code="model_not_found")
    colours = [[int(c) for c in colour] for colour in served.meta.palette]
    return JSONResponse({"model": model, "classes": list(served.meta.class_names), "palette": colours})


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root_path = request.scope.get("root_path", "")
    app = request.app
    page = get_swagger_ui_html(
        openapi_url=f"{root_path}{app.openapi_url}", title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=f"{root_path}{app.swagger_ui_oauth2_redirect_url}",
        swagger_js_url=f"{root_path}{DOCS_STATIC}/swagger-ui-bundle.js",
        swagger_css_url=f"{root_path}{DOCS_STATIC}/swagger-ui.css",
        swagger_favicon_url=f"{root_path}{DOCS_STATIC}/favicon.png",
        swagger_ui_parameters=app.swagger_ui_parameters,
    )
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root_path = request.scope.get("root_path", "")
    page = get_redoc_html(
        openapi_url=f"{root_path}{request.app.openapi_url}", title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root_path}{DOCS_STATIC}/redoc.standalone.js",
        redoc_favicon_url=f"{root_path}{DOCS_STATIC}/favicon.png", with_google_fonts=False,
    )
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


@router.get(DOCS_STATIC + "/{name}")
async def docs_static(name: str) -> Response:
    if name not in DOCS_ASSETS:
        raise NotFound(f"no docs asset named {name!r}", code="asset_not_found")
    return asset_response(name, docs_asset(name), ASSET_CACHE)
