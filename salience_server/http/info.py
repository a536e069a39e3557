"""GET /v1/models, GET /health and GET /v1/readout/manifest."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from salience_server.http.backend import Backend
from salience_server.http.errors import ApiError

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """The served model, under each name it answers to."""
    backend: Backend = request.app.state.backend
    info = await backend.model_info()
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": backend.created,
                "owned_by": "salience",
                "max_model_len": info.max_context,
            }
            for name in backend.model_names(info)
        ],
    }


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    """One model by name; 404 unless served."""
    backend: Backend = request.app.state.backend
    await backend.check_model(model)
    return {"id": model, "object": "model", "created": backend.created, "owned_by": "salience"}


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while the gRPC server reports SERVING, else 503. Never needs a key."""
    backend: Backend = request.app.state.backend
    if await backend.is_serving():
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unavailable"}, status_code=503)


@router.get("/v1/readout/manifest")
async def readout_manifest(request: Request) -> dict[str, Any]:
    """The concepts and layers of the server's readout; 404 while readout is off."""
    backend: Backend = request.app.state.backend
    info = await backend.model_info()
    if not info.supports_readout:
        raise ApiError(
            404, "readout is not enabled on this server", "not_found_error", code="readout_disabled"
        )
    return {"concepts": info.readout_concepts, "layers": info.readout_layers}
