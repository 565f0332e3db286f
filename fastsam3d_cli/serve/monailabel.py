"""The subset of MONAI Label's REST API that its 3D Slicer module needs to drive an interactive model.

Request and response shapes follow MONAI Label's own client (`monailabel/client/client.py`, read for the
format only):

* `GET /info/` — the app: name, labels and `models`; our one model is `{"type": "deepgrow", "dimension": 3}`,
  so Slicer offers foreground/background point tools for it.
* `PUT /session/` — multipart form, the volume in part `files` (other fields such as `client_id` ignored);
  answers `{"session_id": ..., "session_info": {...}}`. `GET /session/{id}` answers the same, 404/410 when
  unknown or closed; `DELETE /session/{id}` closes it.
* `POST /infer/{model}?image=ID[&session_id=S]` — multipart form with a `params` field (JSON:
  `label`, `foreground` and `background` as lists of voxel indices i, j, k of the volume, optional
  `result_extension`), and the volume in part `file` when there is no session. Without a session or
  file, `image` names a volume under `--root`. Answers a multipart form: `params` (JSON with
  `label_names` and timings) and the mask on the input grid (uint8, 1 = the object) as a file.

Each request carries all of the object's points; points the object already has are kept, new ones are
appended (see `Session.set_points`).
"""
from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from fastsam3d_cli.serve.errors import ApiError
from fastsam3d_cli.serve.multipart import Part, build_form, parse_form
from fastsam3d_cli.serve.paths import resolve_under_root

RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
MAX_PARAMS_BYTES = 1 << 20


def _params(parts: list[Any]) -> dict[str, Any]:
    for part in parts:
        if part.name == "params":
            try:
                value = json.loads(part.data.decode("utf-8") or "{}")
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ApiError(422, f"field 'params': not valid JSON ({type(exc).__name__})") from None
            if not isinstance(value, dict):
                raise ApiError(422, "field 'params': must be a JSON object")
            return value
    return {}


def _points(params: dict[str, Any], key: str) -> list[Any]:
    value = params.get(key, [])
    if value is None:
        return []
    if not isinstance(value, list) or any(not isinstance(p, (list, tuple)) for p in value):
        raise ApiError(422, f"field '{key}': give a list of [i, j, k] voxel indices")
    return value


def add_monailabel_routes(app: FastAPI, server: Any,
                          read_body: Callable[[Request, int], Awaitable[bytes]]) -> None:
    """Register the MONAI Label routes on `app` (sessions live in the same store as the JSON API's)."""
    from fastsam3d_cli import __version__

    config = server.config
    model_name = str(config.loaded.preset)

    def session_info(session: Any) -> dict[str, Any]:
        described = session.describe()
        return {"session_id": session.id,
                "session_info": {"name": described["name"], "size": described["size"],
                                 "spacing": described["spacing"], "created": session.created}}

    @app.get("/info/", tags=["monailabel"])
    def info() -> dict[str, Any]:
        return {"name": "fastsam3d", "description": "fastsam3d serve: click-driven 3D segmentation (FastSAM3D / "
                                                    "SAM-Med3D)",
                "version": __version__, "labels": [],
                "models": {model_name: {"type": "deepgrow", "dimension": 3, "labels": [],
                                        "description": f"{model_name}: include (foreground) and exclude (background) "
                                                       "points → a mask on the input grid", "config": {}}},
                "trainers": {}, "strategies": {}, "scoring": {}, "train_stats": {},
                "datastore": {"total": 0, "completed": 0}}

    @app.put("/session/", tags=["monailabel"])
    async def create_session(request: Request) -> dict[str, Any]:
        body = await read_body(request, config.max_upload_bytes)
        parts = parse_form(request.headers.get("content-type", ""), body)
        files = [p for p in parts if p.filename]
        if len(files) != 1:
            raise ApiError(400, f"field 'files': send exactly one volume file (got {len(files)})")
        session = await run_in_threadpool(server.open_upload, files[0].filename, files[0].data)
        return session_info(session)

    @app.get("/session/{session_id}", tags=["monailabel"])
    def get_session(session_id: str) -> dict[str, Any]:
        with server.store.use(session_id) as session:
            return session_info(session)

    @app.delete("/session/{session_id}", tags=["monailabel"])
    def remove_session(session_id: str) -> dict[str, Any]:
        server.store.close(session_id)
        return {"session_id": session_id}

    @app.post("/infer/{model}", tags=["monailabel"])
    async def infer(model: str, request: Request, image: str = "", session_id: Optional[str] = None,
                    output: str = "all") -> Response:
        if model != model_name:
            raise ApiError(404, f"no model '{model}'; this server has '{model_name}'")
        if output not in ("all", "image", "json"):
            raise ApiError(422, f"field 'output': {output!r} is not one of all, image, json")
        content_type = request.headers.get("content-type", "")
        body = await read_body(request, config.max_upload_bytes)
        if "multipart/form-data" in content_type:
            parts = parse_form(content_type, body)
        elif body.strip():
            parts = [Part("params", None, body)]
        else:
            parts = []
        params = _params(parts)
        upload = next((p for p in parts if p.name == "file" and p.filename), None)
        label = params.get("label") or "object"
        if not isinstance(label, str):
            raise ApiError(422, "field 'label': give the object's name as text")
        include, exclude = _points(params, "foreground"), _points(params, "background")
        extension = params.get("result_extension") or ".nii.gz"
        if extension not in RESULT_EXTENSIONS:
            raise ApiError(422, f"field 'result_extension': {extension!r} is not one of {', '.join(RESULT_EXTENSIONS)}")

        def run(session: Any) -> tuple[dict[str, Any], bytes]:
            result = session.set_points(label, include, exclude, "ijk")
            data = session.volume_bytes(session.mask(label).astype("uint8"), extension)
            timing = result["timing"]
            return {"label_names": {label: 1}, "latencies": {"infer": round(timing["ms"] / 1000.0, 4),
                                                            "total": round(timing["ms"] / 1000.0, 4)},
                    "fastsam3d": {"voxels": result["voxels"], "clicks": result["clicks"], "timing_ms": timing}}, data

        def in_session() -> tuple[dict[str, Any], bytes]:
            if session_id:
                with server.store.use(session_id) as session:
                    return run(session)
            if upload is not None:
                session = server.open_upload(upload.filename, upload.data)
            elif image:
                path = resolve_under_root(config.root, image)
                session = server.open_path(path, image)
            else:
                raise ApiError(422, "field 'image': give a session_id, a file, or a volume path under --root")
            try:
                with server.store.use(session.id) as opened:
                    return run(opened)
            finally:
                server.store.close(session.id)  # a one-off request keeps no session

        result, data = await run_in_threadpool(in_session)
        if output == "json":
            return JSONResponse(result)
        filename = f"result{extension}"
        if output == "image":
            return Response(data, media_type="application/octet-stream",
                            headers={"Content-Disposition": f'attachment; filename="{filename}"'})
        content, form = build_form({"params": json.dumps(result)}, {"file": (filename, data, "application/octet-stream")})
        return Response(form, media_type=content)
