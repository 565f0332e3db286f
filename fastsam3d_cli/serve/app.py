"""The FastAPI application: the JSON API under /api, the NiiVue page at /, MONAI Label routes (`monailabel`).

Every error a client can cause is a 4xx JSON body `{"error": "<one line>", "status": N}`; an unexpected
failure is a 500 with the same shape and no traceback. With a token, every route except the page and its
static files needs `Authorization: Bearer <token>`.
"""
from __future__ import annotations

import hmac
import json
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastsam3d_cli.errors import FastSAM3DError
from fastsam3d_cli.serve.errors import ApiError
from fastsam3d_cli.serve.paths import IMAGE_SUFFIXES, list_images, resolve_under_root
from fastsam3d_cli.serve.session import Session
from fastsam3d_cli.serve.store import SessionStore

STATIC_DIR = Path(__file__).with_name("static")
PUBLIC_PREFIXES = ("/static/",)
PUBLIC_PATHS = ("/", "/favicon.ico")


@dataclass
class ServeConfig:
    """What the server runs with (built by `server.run_server`, or by tests)."""

    loaded: Any  # weights.loading.LoadedModel
    root: Path | None = None
    token: str | None = None
    max_sessions: int = 8
    max_memory_bytes: int | None = None
    max_upload_bytes: int = 1024 * 1024 * 1024
    max_crops: int = 8
    upload_dir: Path | None = None  # where uploads are kept while their session is open (default: system temp)
    compute_lock: threading.Lock = field(default_factory=threading.Lock)


class OpenRequest(BaseModel):
    path: str = Field(..., description="volume path relative to --root: an image file, or a DICOM folder or .zip")
    series: Optional[str] = Field(None, description="SeriesInstanceUID when the DICOM folder holds several series")


class ObjectRequest(BaseModel):
    name: str
    label: Optional[int] = Field(None, description="labelmap value (default: the lowest free one)")
    colour: Optional[str] = Field(None, description="#rrggbb")


class ClickRequest(BaseModel):
    point: list[float] = Field(..., min_length=3, max_length=3, description="position in `space`")
    include: bool = True
    space: Literal["ijk", "ras", "lps"] = "ijk"


# ------------------------------------------------------------------------------------------ helpers
def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split()), "status": status}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})"
    where = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    field_name = ".".join(where) or "body"
    return f"field '{field_name}': {first.get('msg', 'invalid value')}"


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _host_name(host: str) -> str:
    """The name part of a Host header (`[::1]:8000` → `::1`, `localhost:80` → `localhost`)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _image_suffix(name: str) -> str | None:
    lower = name.lower()
    return next((s for s in IMAGE_SUFFIXES if lower.endswith(s)), None)


async def read_limited_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is larger than `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"upload of {int(declared)} bytes exceeds the limit of {limit} bytes (--max-upload)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"upload exceeds the limit of {limit} bytes (--max-upload)")
        chunks.append(chunk)
    return b"".join(chunks)


class Server:
    """The state behind the routes: configuration and open sessions."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.store = SessionStore(config.max_sessions, config.max_memory_bytes)

    def open_path(self, path: Path, display_name: str | None = None, series: str | None = None) -> Session:
        return self.store.add(lambda sid: self._make(sid, path, display_name or path.name, None, series))

    def open_upload(self, filename: str, data: bytes, series: str | None = None) -> Session:
        name = Path(str(filename).replace("\\", "/")).name
        suffix = ".zip" if name.lower().endswith(".zip") else _image_suffix(name)
        if suffix is None:
            raise ApiError(400, f"upload '{name}' has no volume suffix; use one of {', '.join(IMAGE_SUFFIXES)}, "
                                "or .zip for a DICOM series")
        if not data:
            raise ApiError(400, f"upload '{name}' is empty")
        folder = Path(tempfile.mkdtemp(prefix="fastsam3d-serve-", dir=self.config.upload_dir))
        path = folder / f"volume{suffix}"
        path.write_bytes(data)
        try:
            return self.store.add(lambda sid: self._make(sid, path, name, folder, series))
        except BaseException:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _make(self, session_id: str, path: Path, display_name: str, owned: Path | None,
              series: str | None = None) -> Session:
        from fastsam3d_cli.imaging.world import nifti_header, world_geometry
        from fastsam3d_cli.interactive.export import read_input
        from fastsam3d_cli.interactive.predictor import Predictor

        loaded = self.config.loaded
        predictor = Predictor(loaded.model, loaded.device, max_crops=self.config.max_crops)
        try:  # as infer: the NIfTI header is read once, for the world geometry and the results' header
            image, dicom = read_input(path, None, series)  # a folder / .zip is a DICOM series
            header = nifti_header(path, image)
            predictor.set_volume(image, world=world_geometry(path, image, header))
        except FastSAM3DError as exc:
            raise ApiError(400, f"'{display_name}' is not a readable 3D volume: "
                                f"{exc.message.replace(str(path), display_name)}") from None
        viewer = path
        if dicom is not None:  # the viewer gets the series as one NIfTI (its geometry: the series' own)
            import SimpleITK as sitk

            if owned is None:
                owned = Path(tempfile.mkdtemp(prefix="fastsam3d-serve-", dir=self.config.upload_dir))
            viewer = owned / "volume.nii"
            sitk.WriteImage(image, str(viewer))
        try:
            return Session(session_id, predictor, path, display_name, self.config.compute_lock, owned,
                           nifti_header=header, viewer_path=viewer)
        except BaseException:
            if owned is not None and dicom is not None:
                import shutil

                shutil.rmtree(owned, ignore_errors=True)
            raise

    def sidecar(self, session: Session) -> dict[str, Any]:
        """The labelmap's sidecar: `infer`'s model and pipeline records, the session's objects and click file."""
        from fastsam3d_cli import __version__
        from fastsam3d_cli.interactive.infer import model_record, pipeline_record

        labels = session.labelmap()
        counts = np.bincount(labels.ravel(), minlength=1) if labels.size else np.zeros(1, int)
        image = session.predictor.input_image
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        objects = []
        for spec in session.clicked_objects():
            voxels = int(counts[spec.label]) if spec.label < len(counts) else 0
            report = session.predictor.object_report(spec.name)
            objects.append({**spec.describe(), "voxels": voxels, "volume_ml": round(voxels * voxel_ml, 4),
                            "clicks": report["clicks"], "crops_run": report["crops_run"],
                            "unused_clicks": report["unused_clicks"], "timings": spec.timings})
        return {"fastsam3d": __version__, "session": session.id,
                "input": {k: v for k, v in session.describe().items() if k not in ("objects", "id")},
                "labelmap_dtype": str(labels.dtype), **model_record(self.config.loaded),
                "pipeline": pipeline_record(session.predictor, self.config.max_crops),
                "max_crops": self.config.max_crops, "objects": objects, "clicks_file": session.export_clicks(),
                "warnings": session.export_warnings()}


def _mask_response(mask: np.ndarray) -> Response:
    """Compact binary mask: the bounding box's bits (Fortran order: i fastest, as NIfTI), packed little-endian."""
    headers = {"X-Mask-Size": ",".join(str(n) for n in mask.shape)}
    found = np.nonzero(mask)
    if not found[0].size:
        headers.update({"X-Mask-Start": "0,0,0", "X-Mask-Shape": "0,0,0", "X-Mask-Voxels": "0"})
        return Response(b"", media_type="application/octet-stream", headers=headers)
    lo = [int(a.min()) for a in found]
    hi = [int(a.max()) + 1 for a in found]
    box = mask[tuple(slice(a, b) for a, b in zip(lo, hi))]
    headers.update({"X-Mask-Start": ",".join(map(str, lo)), "X-Mask-Shape": ",".join(str(n) for n in box.shape),
                    "X-Mask-Voxels": str(int(found[0].size))})
    return Response(np.packbits(box.ravel(order="F"), bitorder="little").tobytes(),
                    media_type="application/octet-stream", headers=headers)


def _read_mask(data: bytes, filename: str, label: int | None, session: Session) -> np.ndarray:
    """A mask upload as a bool array on the session's input grid (400 naming the problem otherwise)."""
    from fastsam3d_cli.imaging.volumes import array_ijk, read_image

    suffix = _image_suffix(Path(str(filename)).name)
    if suffix is None:
        raise ApiError(400, f"field 'filename': {filename[:60]!r} has no volume suffix; use one of "
                            f"{', '.join(IMAGE_SUFFIXES)}")
    if not data:
        raise ApiError(400, "the mask upload is empty")
    with tempfile.TemporaryDirectory(prefix="fastsam3d-serve-") as folder:
        path = Path(folder) / f"mask{suffix}"
        path.write_bytes(data)
        try:
            image = read_image(path, None, strict_channel=True)
        except FastSAM3DError as exc:
            raise ApiError(400, f"the mask is not a readable 3D volume: {exc.message.replace(str(path), filename)}") \
                from None
    volume = session.predictor.input_image
    if tuple(image.GetSize()) != tuple(volume.GetSize()) or not (
            np.allclose(image.GetSpacing(), volume.GetSpacing(), rtol=1e-4, atol=1e-4)
            and np.allclose(image.GetOrigin(), volume.GetOrigin(), atol=1e-3)
            and np.allclose(image.GetDirection(), volume.GetDirection(), atol=1e-4)):
        raise ApiError(400, f"the mask's grid ({'×'.join(map(str, image.GetSize()))} voxels of "
                            f"{', '.join(f'{v:g}' for v in image.GetSpacing())} mm) is not the volume's "
                            f"({'×'.join(map(str, volume.GetSize()))} of "
                            f"{', '.join(f'{v:g}' for v in volume.GetSpacing())} mm); give a mask on the volume's grid")
    values = array_ijk(image)
    mask = values != 0 if label is None else values == label
    if not mask.any():
        raise ApiError(400, "the mask is empty" + ("" if label is None else f" (no voxel has label {label})"))
    return mask


def _box_field(name: str, text: str, minimum: int, size: Sequence[int]) -> tuple[int, int, int]:
    """A box corner or size from a query parameter "a,b,c" (422 naming the field when it is not usable)."""
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or any(v < minimum or v > s for v, s in zip(values, size)):
        raise ApiError(422, f"field '{name}': {text[:60]!r} is not three integers from {minimum} to the volume size "
                            f"{list(size)}")
    return values  # type: ignore[return-value]


def decode_mask(body: bytes, headers: Any) -> np.ndarray:
    """Inverse of the compact mask form (for clients written in Python, and the tests)."""
    size = tuple(int(v) for v in headers["X-Mask-Size"].split(","))
    start = tuple(int(v) for v in headers["X-Mask-Start"].split(","))
    shape = tuple(int(v) for v in headers["X-Mask-Shape"].split(","))
    mask = np.zeros(size, dtype=bool)
    count = int(np.prod(shape))
    if count:
        bits = np.unpackbits(np.frombuffer(body, dtype=np.uint8), bitorder="little")[:count].astype(bool)
        mask[tuple(slice(s, s + n) for s, n in zip(start, shape))] = bits.reshape(shape, order="F")
    return mask


# ------------------------------------------------------------------------------------------ the app
def create_app(config: ServeConfig) -> FastAPI:
    """The application for `config` (its `Server` is `app.state.server`)."""
    from fastsam3d_cli import __version__
    from fastsam3d_cli.serve.monailabel import add_monailabel_routes

    server = Server(config)
    app = FastAPI(title="fastsam3d serve", version=__version__,
                  description="Interactive 3D segmentation over HTTP: sessions, objects, clicks, undo/redo, "
                              "results on the input grid. See docs/serve.md.")
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}"
        return _error(exc.status_code, detail)

    @app.exception_handler(FastSAM3DError)
    async def _fastsam3d(request: Request, exc: FastSAM3DError) -> JSONResponse:
        return _error(400, exc.one_line())

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        first = (str(exc).strip().splitlines() or [""])[0]
        return _error(500, f"internal error: {type(exc).__name__}: {first}")

    @app.middleware("http")
    async def _auth(request: Request, call_next: Any) -> Any:
        token = config.token
        path = request.url.path
        if not token and _host_name(request.headers.get("host", "")) not in LOOPBACK_HOSTS:
            # without a token only loopback clients exist; another name in Host is a DNS-rebinding page
            return _error(403, "requests must address this server as 127.0.0.1 or localhost (a server without "
                               "--token answers no other host name)")
        if token and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                return _error(401, "missing or wrong token: send the header 'Authorization: Bearer <token>'")
        return await call_next(request)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    # ---------------------------------------------------------------------- server and files
    @app.get("/api/info", tags=["server"])
    def info() -> dict[str, Any]:
        loaded = config.loaded
        return {"fastsam3d": __version__, "model": loaded.preset, "checkpoint": str(Path(loaded.checkpoint).name),
                "device": str(loaded.device), "attention": loaded.attention, "dtype": loaded.dtype,
                "max_crops": config.max_crops, "root": config.root is not None,
                "max_sessions": config.max_sessions, "max_upload_bytes": config.max_upload_bytes,
                "sessions": server.store.ids()}

    @app.get("/api/files", tags=["server"])
    def files() -> dict[str, Any]:
        """Volumes under --root (relative paths) that can be opened by path."""
        return {"root": config.root is not None, "files": list_images(config.root)}

    # ---------------------------------------------------------------------- sessions
    @app.post("/api/sessions", status_code=201, tags=["sessions"])
    async def open_session(request: Request, filename: Optional[str] = None,
                           series: Optional[str] = None) -> dict[str, Any]:
        """Open a volume: JSON `{"path": "...", "series"?: UID}` (under --root; a DICOM folder or .zip too), or the
        file itself as the body with `?filename=` (a DICOM series as a .zip, `?series=` to pick one)."""
        if request.headers.get("content-type", "").split(";")[0].strip() == "application/json":
            raw = await read_limited_body(request, 1 << 20)
            try:
                body = OpenRequest.model_validate_json(raw or b"{}")
            except Exception as exc:  # pydantic ValidationError / bad JSON
                raise ApiError(422, f"field 'path': {_first_error(exc)}") from None
            path = resolve_under_root(config.root, body.path)
            session = await run_in_threadpool(server.open_path, path, body.path, body.series)
        else:
            if not filename:
                raise ApiError(422, "field 'filename': give the upload's file name, e.g. ?filename=ct.nii.gz")
            data = await read_limited_body(request, config.max_upload_bytes)
            session = await run_in_threadpool(server.open_upload, filename, data, series)
        return session.describe()

    @app.get("/api/sessions", tags=["sessions"])
    def list_sessions() -> dict[str, Any]:
        return {"sessions": [{"id": s.id, "name": s.display_name} for s in server.store.sessions()]}

    @app.get("/api/sessions/{sid}", tags=["sessions"])
    def get_session(sid: str) -> dict[str, Any]:
        with server.store.use(sid) as session:
            return session.describe()

    @app.delete("/api/sessions/{sid}", tags=["sessions"])
    def close_session(sid: str) -> dict[str, Any]:
        server.store.close(sid)
        return {"closed": sid}

    @app.get("/api/sessions/{sid}/volume/{filename}", tags=["sessions"])
    def volume(sid: str, filename: str) -> StreamingResponse:
        """The volume as opened (the viewer loads it; the file name only tells it the format)."""
        with server.store.use(sid) as session:  # opened now: an upload evicted meanwhile still streams
            handle = open(session.viewer_path, "rb")  # noqa: SIM115 - closed by the background task
        return StreamingResponse(iter(lambda: handle.read(1 << 20), b""), media_type="application/octet-stream",
                                 background=BackgroundTask(handle.close))

    # ---------------------------------------------------------------------- objects and clicks
    @app.post("/api/sessions/{sid}/objects", status_code=201, tags=["objects"])
    def add_object(sid: str, body: ObjectRequest) -> dict[str, Any]:
        with server.store.use(sid) as session:
            return session.add_object(body.name, body.label, body.colour).describe()

    @app.delete("/api/sessions/{sid}/objects/{name}", tags=["objects"])
    def delete_object(sid: str, name: str) -> dict[str, Any]:
        with server.store.use(sid) as session:
            session.delete_object(name)
            return {"deleted": name}

    @app.post("/api/sessions/{sid}/objects/{name}/reset", tags=["objects"])
    def reset_object(sid: str, name: str) -> dict[str, Any]:
        with server.store.use(sid) as session:
            return session.reset_object(name).describe()

    @app.put("/api/sessions/{sid}/objects/{name}/mask", tags=["objects"])
    async def start_from_mask(sid: str, name: str, request: Request, filename: str,
                              label: Optional[int] = None) -> dict[str, Any]:
        """Start the object from an existing mask: the body is a volume file (`?filename=` gives its format) on
        the session volume's grid; its nonzero voxels, or those equal to `?label=`, are the object. Replaces the
        object's clicks; further clicks refine it (outside their crops the mask stays)."""
        data = await read_limited_body(request, config.max_upload_bytes)

        def start() -> dict[str, Any]:  # in a worker thread, like every route that computes
            with server.store.use(sid) as session:
                session.object(name)  # 404 before reading the upload
                return session.set_mask(name, _read_mask(data, filename, label, session))

        return await run_in_threadpool(start)

    @app.post("/api/sessions/{sid}/objects/{name}/clicks", tags=["clicks"])
    def click(sid: str, name: str, body: ClickRequest) -> dict[str, Any]:
        """One include/exclude click; returns the object's summary and the click's timing (ms)."""
        with server.store.use(sid) as session:
            return session.click(name, body.point, body.include, body.space)

    @app.post("/api/sessions/{sid}/objects/{name}/undo", tags=["clicks"])
    def undo(sid: str, name: str) -> dict[str, Any]:
        with server.store.use(sid) as session:
            return session.undo(name)

    @app.post("/api/sessions/{sid}/objects/{name}/redo", tags=["clicks"])
    def redo(sid: str, name: str) -> dict[str, Any]:
        with server.store.use(sid) as session:
            return session.redo(name)

    @app.get("/api/sessions/{sid}/objects/{name}/timings", tags=["clicks"])
    def timings(sid: str, name: str) -> dict[str, Any]:
        with server.store.use(sid) as session:
            return {"object": name, "timings": session.object(name).timings}

    # ---------------------------------------------------------------------- results
    @app.get("/api/sessions/{sid}/objects/{name}/mask", tags=["results"])
    def mask(sid: str, name: str) -> Response:
        """The object's mask on the input grid, compact: headers X-Mask-Size/Start/Shape, body = packed bits
        of the bounding box in Fortran (NIfTI) order, least significant bit first."""
        with server.store.use(sid) as session:
            return _mask_response(session.mask(name))

    @app.get("/api/sessions/{sid}/objects/{name}/probabilities.nii.gz", tags=["results"])
    def probabilities(sid: str, name: str) -> Response:
        with server.store.use(sid) as session:
            data = session.volume_bytes(session.probabilities(name), ".nii.gz")
        return Response(data, media_type="application/gzip")

    @app.get("/api/sessions/{sid}/labelmap.nii.gz", tags=["results"])
    def labelmap_gz(sid: str) -> Response:
        """All objects as one labelmap on the input grid (uint8, or uint16 above label 255), like `infer`."""
        return _labelmap(sid, ".nii.gz", "application/gzip")

    @app.get("/api/sessions/{sid}/labelmap.nii", tags=["results"])
    def labelmap_nii(sid: str) -> Response:
        """The labelmap uncompressed (what the page loads after each click: no gzip cost)."""
        return _labelmap(sid, ".nii", "application/octet-stream")

    def _labelmap(sid: str, suffix: str, media_type: str) -> Response:
        with server.store.use(sid) as session:  # NIfTI keeps the input's header, like infer
            data = session.volume_bytes(session.labelmap(), suffix)
            stem = Path(session.display_name).name
        stem = stem[: -len(_image_suffix(stem) or "")] if _image_suffix(stem) else stem
        return Response(data, media_type=media_type,
                        headers={"Content-Disposition": f'attachment; filename="{stem}_mask{suffix}"'})

    @app.get("/api/sessions/{sid}/labelmap.raw", tags=["results"])
    def labelmap_box(sid: str, start: str, shape: str) -> Response:
        """Part of the labelmap, raw: the voxels of the box `start`=i,j,k `shape`=a,b,c in Fortran (NIfTI) order,
        little-endian, dtype in X-Labelmap-Dtype (uint8, or uint16 above label 255). A click's answer names the
        box it may have changed ("changed"), so the page updates its overlay without loading the whole map."""
        with server.store.use(sid) as session:
            size = tuple(session.predictor.input_image.GetSize())
            box = (_box_field("start", start, 0, size), _box_field("shape", shape, 1, size))
            if any(a + n > s for a, n, s in zip(box[0], box[1], size)):
                raise ApiError(422, f"field 'shape': the box {list(box[0])} + {list(box[1])} leaves the volume "
                                    f"({list(size)} voxels)")
            labels = session.labelmap(box)
        return Response(labels.astype(labels.dtype.newbyteorder("<"), copy=False).tobytes(order="F"),
                        media_type="application/octet-stream",
                        headers={"X-Labelmap-Dtype": str(labels.dtype), "X-Box-Start": ",".join(map(str, box[0])),
                                 "X-Box-Shape": ",".join(map(str, box[1]))})

    @app.get("/api/sessions/{sid}/labelmap.json", tags=["results"])
    def labelmap_sidecar(sid: str) -> dict[str, Any]:
        """The labelmap's sidecar: input grid, model, per-object voxels, clicks in all spaces, timings."""
        with server.store.use(sid) as session:
            return server.sidecar(session)

    @app.get("/api/sessions/{sid}/clicks.json", tags=["results"])
    def export_clicks(sid: str) -> Response:
        """The session as a click file: `fastsam3d infer VOLUME --clicks clicks.json` gives the same labelmap."""
        with server.store.use(sid) as session:
            text = json.dumps(session.export_clicks(), indent=2) + "\n"
            warnings = session.export_warnings()
        headers = {"Content-Disposition": 'attachment; filename="clicks.json"'}
        if warnings:
            headers["X-Fastsam3d-Warning"] = warnings[0]
        return Response(text, media_type="application/json", headers=headers)

    add_monailabel_routes(app, server, read_limited_body)
    return app


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        found = errors()
        if found:
            return str(found[0].get("msg", "invalid value"))
    return (str(exc).strip().splitlines() or ["invalid value"])[0]


__all__ = ["ServeConfig", "Server", "create_app", "decode_mask"]
