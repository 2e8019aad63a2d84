"""Stages 1-2 — the data: the manifest of images (``manifest``: image ids, labels, photo groups, splits),
the hand-drawn region boxes (``regions``: YOLO txt and Pascal VOC label files, rasterising boxes into
masks), image files (``images``: sniffing, the upright size and RGB decoding with the EXIF rule) and the
positive control's seeded synthetic data set (``decoy``). Imports only floors below (README, "Layout").
"""
