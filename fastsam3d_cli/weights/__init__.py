"""Which weights a model runs with: the named-checkpoint registry, the local cache, verified downloads,
and loading a model by name or file (`loading.load_inference_model`).

May import `model/` and `imaging/` (atomic writes, file locks); nothing above it.
"""
