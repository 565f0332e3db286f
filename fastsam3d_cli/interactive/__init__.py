"""Interactive segmentation of one volume: crops, the crop canvas, the `Predictor` session, file-to-file
`infer`, and previews.

May import `model/`, `imaging/` and `weights/`.
"""
