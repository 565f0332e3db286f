"""`fastsam3d serve`: a local HTTP server over the `Predictor` — JSON API, a NiiVue page, MONAI Label routes.

Layers inside: `session` (one volume, its objects, clicks, undo/redo — no HTTP), `store` (LRU of sessions),
`paths` (--root confinement), `multipart` (stdlib form parsing), `app` (FastAPI routes), `monailabel`
(the MONAI Label subset 3D Slicer uses), `server` (bind, run, shut down). FastAPI and uvicorn are the
optional `[serve]` extra; only `app`, `monailabel` and `server` import them.
"""
