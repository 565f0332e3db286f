"""Honest speed numbers: milliseconds per 128³ volume (`speed.run_benchmark`), FLOPs, peak memory.

May import every layer below the CLI except `training/`.
"""
