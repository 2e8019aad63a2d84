"""Stage 3 — the region detector (paper Sec. III-A): an Ultralytics YOLO model learns the region classes
from the few annotated photos and finds them in every photo.

``training`` (:func:`~mgfa_ray.detector.training.train_detector`, the stage) runs the steps: ``dataset``
(prepare the annotated photos and their held-out split or folds), ``fit`` (train, evaluate mAP@0.5
and the masks' overlap, publish), ``cross_validation`` (k folds over photo groups); ``key`` names a
detector by its inputs; ``inference`` loads it and predicts boxes; ``overlap`` scores its masks
against the hand-drawn ones; ``backbone`` puts a pretrained torchvision backbone under YOLO; ``yolo``
imports Ultralytics offline. Model YAMLs shipped with the package are in ``models/``.
"""
