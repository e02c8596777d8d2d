"""Files inside a named sandbox: read (JSON or raw stream), write (JSON or raw stream), delete."""

from __future__ import annotations

import base64
import binascii
import contextlib
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from ...errors import ValidationError
from ...spec import validate_name
from .. import models as M
from ..deps import JSON_READ_LIMIT, Svc, Tenant, TooLarge, describe_pydantic
from ..service import file_path

router = APIRouter(tags=["files"])
_REF = "#/components/schemas/"


@router.get("/sandboxes/{name}/files/{path:path}",
            responses={200: {"content": {"application/json": {"schema": {"$ref": _REF + "FileReadEnvelope"}},
                                         "application/octet-stream": {}},
                             "description": "JSON {content, encoding, size} (reference-compatible), or the raw "
                             "bytes streamed with Accept: application/octet-stream (or ?raw=true)"}})
async def read_file(name: str, path: str, request: Request, tenant: Tenant, svc: Svc, raw: bool = False):
    p = file_path(path)
    first, rest = await svc.read_file_head(tenant, name, p)
    accept = request.headers.get("accept", "")
    if raw or ("application/octet-stream" in accept and "application/json" not in accept):
        async def body():
            if first is not None:
                yield first
            async for chunk in rest:
                yield chunk

        return StreamingResponse(body(), media_type="application/octet-stream",
                                 headers={"X-Content-Type-Options": "nosniff"})
    buf = bytearray(first or b"")
    async for chunk in rest:
        buf += chunk
        if len(buf) > JSON_READ_LIMIT:
            with contextlib.suppress(Exception):
                await rest.aclose()
            raise TooLarge(f"file is larger than {JSON_READ_LIMIT} bytes: download it raw "
                           "(Accept: application/octet-stream or ?raw=true)")
    data = bytes(buf)
    try:
        content, enc = data.decode("utf-8"), "utf8"
    except UnicodeDecodeError:
        content, enc = base64.b64encode(data).decode(), "base64"
    return M.envelope({"content": content, "encoding": enc, "size": len(data)})


@router.put("/sandboxes/{name}/files/{path:path}", response_model=M.Envelope[M.FileWriteResult],
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/json": {"schema": {"$ref": _REF + "FileWriteRequest"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def write_file(name: str, path: str, request: Request, tenant: Tenant, svc: Svc,
                     mode: Annotated[int | None, Query(ge=0, le=0o7777)] = None):
    """Write a file: JSON ``{content, encoding: utf8|base64}`` (reference-compatible), or any other
    content type as the raw bytes, streamed to the sandbox (no buffering, limit 1 GiB)."""
    p = file_path(path)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            body = M.FileWriteRequest.model_validate_json(await request.body())
        except ValueError as exc:
            raise ValidationError(describe_pydantic(exc)) from None
        if body.encoding == "base64":
            try:
                data = base64.b64decode(body.content, validate=True)
            except (binascii.Error, ValueError):
                raise ValidationError("content is not valid base64") from None
        else:
            data = body.content.encode()
        n = await svc.write_file(tenant, name, p, data, body.mode if body.mode is not None else mode)
    else:
        svc.manager.get(validate_name(name), tenant)
        n = await svc.write_file(tenant, name, p, request.stream(), mode)
    return M.envelope({"path": p, "size": n})


@router.delete("/sandboxes/{name}/files/{path:path}", response_model=M.Envelope[str])
async def delete_file(name: str, path: str, tenant: Tenant, svc: Svc):
    p = file_path(path)
    await svc.delete_file(tenant, name, p)
    return M.envelope(f"Deleted {p}")
