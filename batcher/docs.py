"""Swagger UI at /docs, from the assets the `swagger-ui-bundle-v2` package ships (Swagger
UI 5, which reads OpenAPI 3.1; no CDN). Only the files the page loads are served, by
name: any other name is a 404, never a path on disk."""

from __future__ import annotations

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

from batcher.errors import NotFound

ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png", "favicon-16x16.png")
_FILES = {name: swagger_ui_path / name for name in ASSETS}
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>batcher API</title>
<link rel="icon" type="image/png" href="/docs/static/favicon-32x32.png" sizes="32x32">
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true});</script>
</body></html>
"""


async def page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")


async def asset(request: web.Request) -> web.FileResponse:
    path = _FILES.get(request.match_info["name"])
    if path is None:
        raise NotFound("no such file under /docs/static")
    return web.FileResponse(path, headers={"Cache-Control": "public, max-age=86400"})
