"""Volumes and geometry: reading and writing images, click files, crop boxes, atomic writes, file locks.

Depends only on `fastsam3d_cli.errors`; every layer above reads and writes files through it.
"""

# The isotropic spacing every published model was trained at (prepare's default). Here, not in crops.py, so the
# command line can show it as a default without importing numpy (`fastsam3d --help` stays light).
MODEL_SPACING_MM = 1.5
