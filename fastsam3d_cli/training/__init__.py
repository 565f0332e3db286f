"""Learning: the trainer, `train`, `validate`, `distill`, the teacher feature cache, losses, simulated
clicks, DDP plumbing and training plots.

May import every layer below it: `model/`, `imaging/`, `weights/`, `data/`, `interactive/`.
"""
