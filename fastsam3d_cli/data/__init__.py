"""Training data: nnU-Net datasets, `prepare` (→ per-class binary data at 1.5 mm), the prepared layout,
grid placement, and the 128³ training crops.

May import `imaging/` (and `model/` for shapes); never the interactive, training or CLI layers.
"""
