"""Volumes and geometry: reading and writing images, click files, crop boxes, atomic writes, file locks.

Depends only on `fastsam3d_cli.errors`; every layer above reads and writes files through it.
"""
