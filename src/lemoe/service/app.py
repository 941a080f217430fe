"""The HTTP layer of ``lemoe serve``: a FastAPI application over one :class:`EditService`.

FastAPI gives the OpenAPI schema (``/openapi.json``, browsable at ``/docs``) and pydantic models;
what an editing service must guarantee is kept explicit here:

* the body size is checked from ``Content-Length`` *before* a byte is read (an ASGI middleware
  outside everything else); chunked bodies and POSTs without a length are refused;
* every error is a JSON body ``{"error": {"code", "message"}}`` with a 4xx status (a 500 only for a
  bug), including unknown routes, wrong verbs and malformed JSON;
* the body is decoded by the service itself (exact codes: ``bad_json``, ``bad_encoding``, 415 for
  another content type), then validated by the pydantic model or the store's own validator, so
  nothing unvalidated reaches the journal;
* ``Authorization: Bearer TOKEN`` on every API route; public are only ``/v1/health``, the schema
  and ``/docs``, and the console's static files (none of which hold data).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from importlib.resources import files
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from lemoe.service import schemas
from lemoe.service.errors import ApiError, openai_type
from lemoe.service.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from lemoe.service.server import EditService

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorBody, "description": what}
    for code, what in [
        (400, "malformed body or query"),
        (401, "missing or wrong token"),
        (404, "no such route or object"),
        (409, "refused by the store's state"),
        (413, "body over the limit"),
        (422, "well-formed JSON that is not a valid request"),
    ]
}


class AsciiJSONResponse(JSONResponse):
    """JSON in ASCII: any text (a message quoting odd input, lone surrogates included) is safe."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(
    status: int, code: str, message: str, *, param: str | None = None, close: bool = False
) -> AsciiJSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="lemoe"'} if status == 401 else {}
    if close:
        headers["Connection"] = "close"
    error = {"code": code, "message": message, "type": openai_type(status), "param": param}
    return AsciiJSONResponse({"error": error}, status_code=status, headers=headers)


class BodyLimit:
    """Refuse a body by its headers, before it is read: chunked, no length on POST, over the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                await error_response(*refusal, close=True)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        headers = {k.lower(): v for k, v in scope["headers"]}
        if b"transfer-encoding" in headers:
            return 411, "length_required", "chunked bodies are not accepted; send Content-Length"
        length = headers.get(b"content-length")
        if length is None:
            if scope["method"] == "POST":
                return 411, "length_required", "POST needs a Content-Length header"
            return None
        if not re.fullmatch(rb"[0-9]{1,19}", length.strip()):
            return 400, "bad_length", "Content-Length must be a non-negative integer"
        if int(length) > self.max_bytes:
            return 413, "too_large", f"body of {int(length)} bytes; the limit is {self.max_bytes}"
        return None


async def json_body(request: Request) -> Any:
    """The request's JSON body (``None`` when empty), decoded with the service's own error codes."""
    raw = await request.body()
    if not raw:
        return None
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "unsupported_media_type", "send Content-Type: application/json")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "bad_encoding", "the body is not UTF-8") from None
    except RecursionError:
        raise ApiError(400, "bad_json", "JSON nested too deeply") from None
    except ValueError as e:
        raise ApiError(400, "bad_json", f"malformed JSON: {e}") from None


async def required_body(payload: Annotated[Any, Depends(json_body)]) -> Any:
    if payload is None:
        raise ApiError(400, "missing_body", "this route needs a JSON body")
    return payload


bearer = HTTPBearer(auto_error=False, description="the service token (STORE/serve.token by default)")
Body = Annotated[Any, Depends(required_body)]  # a route's JSON body, required


def no_query(request: Request) -> None:
    if request.query_params:
        raise ApiError(400, "bad_query", f"{request.url.path} takes no query parameters")


def _documented(model: type[schemas.BaseModel]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for a route that reads its body itself (see :func:`json_body`)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(model)}}}}


def _ref(model: type[schemas.BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


BODY_MODELS: list[type[schemas.BaseModel]] = [
    schemas.SubmitIn,
    schemas.EditRequestIn,
    schemas.RollbackIn,
    schemas.GenerateIn,
]


def create_app(service: EditService) -> FastAPI:
    """The application serving ``service``; ``uvicorn`` runs it (see :meth:`EditService.start`)."""
    from lemoe.service.openai_api import OPENAI_BODY_MODELS, openai_router

    app = FastAPI(
        title="lemoe editing service",
        description="Edit a served language model's facts, follow and roll back edits, and ask the edited model.",
        version="1",
        default_response_class=AsciiJSONResponse,
        redirect_slashes=False,
        redoc_url=None,
    )
    app.add_middleware(BodyLimit, max_bytes=service.config.max_body_bytes)

    def authenticate(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        given = credentials.credentials if credentials is not None else ""
        if credentials is None or not hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), service.config.token.encode()
        ):
            raise ApiError(401, "unauthorized", "missing or wrong token (Authorization: Bearer TOKEN)")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> Response:
        return error_response(e.status, e.code, e.message, param=e.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> Response:
        if e.status_code == 404:
            return error_response(404, "not_found", f"no route {request.url.path!r}")
        if e.status_code == 405:
            allowed = (e.headers or {}).get("Allow", "")
            return error_response(405, "method_not_allowed", f"{request.method} {request.url.path}: allowed {allowed}")
        return error_response(e.status_code, "http_error", str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> Response:
        return error_response(422, "invalid_request", _validation_message(e.errors()), param=first_param(e.errors()))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> Response:  # reported honestly as a 500
        return error_response(500, "internal", f"{type(e).__name__}: {e}")

    @app.get("/v1/health", response_model=schemas.HealthOut, tags=["service"])
    def health() -> dict[str, str]:
        """Liveness; needs no token."""
        return {"status": "ok"}

    api = APIRouter(prefix="/v1", dependencies=[Depends(authenticate)], responses=ERRORS)

    @api.get("/store", response_model=schemas.StoreOut, dependencies=[Depends(no_query)], tags=["service"])
    def store_info() -> dict[str, Any]:
        """Model, method, edit counts by status, writer state."""
        return service.info()

    @api.post(
        "/edits",
        status_code=202,
        response_model=schemas.SubmitOut,
        dependencies=[Depends(no_query)],
        openapi_extra=_documented(schemas.SubmitIn),
        tags=["edits"],
    )
    def submit(payload: Body) -> dict[str, Any]:
        """Accept edits: ``{"requests": [...]}`` (or one request object); applied in arrival order."""
        return service.submit(payload)

    @api.get("/edits", response_model=schemas.EditsOut, tags=["edits"])
    def list_edits(request: Request) -> dict[str, Any]:
        """Edits in arrival order; query ``status``, ``after`` (a seq) and ``limit`` (1..1000)."""
        query: dict[str, list[str]] = {}
        for k, v in request.query_params.multi_items():
            query.setdefault(k, []).append(v)
        return service.list_edits(query)

    @api.get("/edits/{seq:int}", response_model=schemas.EditOut, dependencies=[Depends(no_query)], tags=["edits"])
    def get_edit(seq: int) -> dict[str, Any]:
        """One edit and its status."""
        return service.get_edit(seq)

    @api.get("/batches", response_model=schemas.BatchesOut, dependencies=[Depends(no_query)], tags=["edits"])
    def list_batches() -> dict[str, Any]:
        """Batches and their status."""
        return service.list_batches()

    @api.post(
        "/rollback",
        response_model=schemas.RollbackOut,
        dependencies=[Depends(no_query)],
        openapi_extra=_documented(schemas.RollbackIn),
        tags=["edits"],
    )
    def rollback(payload: Body) -> dict[str, Any]:
        """Undo one batch (``batch``) or every batch after one (``after``)."""
        return service.rollback(payload)

    @api.post(
        "/generate",
        response_model=schemas.GenerateOut,
        dependencies=[Depends(no_query)],
        openapi_extra=_documented(schemas.GenerateIn),
        tags=["generation"],
    )
    async def generate(payload: Body) -> dict[str, Any]:
        """Greedy continuation of ``prompt`` by the edited model (or, ``"model": "base"``, the unedited one)."""
        job = service.generation_job(payload)
        result = await asyncio.wrap_future(service.generator.submit(job))
        return {"text": result.text, "state_version": result.state_version, "model": job.model}

    def metrics() -> Response:
        """Prometheus text exposition (scrape with the same bearer token)."""
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE)

    app.include_router(api)
    app.include_router(openai_router(service), dependencies=[Depends(authenticate)])
    app.add_api_route("/metrics", metrics, methods=["GET"], dependencies=[Depends(authenticate)], tags=["service"])

    console = files("lemoe.service") / "console"
    app.mount("/console/", StaticFiles(directory=str(console), html=True), name="console")
    app.add_api_route("/console", lambda: RedirectResponse("/console/"), methods=["GET"], include_in_schema=False)

    _publish_body_models(app, BODY_MODELS + OPENAI_BODY_MODELS)
    return app


def _publish_body_models(app: FastAPI, models: list[type[schemas.BaseModel]]) -> None:
    """Add the request models that routes read themselves to the schema's components."""
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _, defs = models_json_schema(
                [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def first_param(errors: Any) -> str | None:
    """The dotted path of the first invalid field (OpenAI's ``param``), or None for the body as a whole."""
    for err in list(errors)[:1]:
        return ".".join(str(x) for x in err.get("loc", ()) if x != "body") or None
    return None


def _validation_message(errors: Any) -> str:
    parts = []
    for err in list(errors)[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{where or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"
