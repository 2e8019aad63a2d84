"""Stage 5 — the trial function: the mask-guided classifier (paper Eq. 2-8) trained and evaluated for one
configuration, in plain PyTorch and without Ray.

``model`` (backbone, attention module, Eq. 5-6 feature mix, Eq. 7-8 loss), ``augment`` (crop and flip
of image and masks together), ``targets`` (jittered crop windows, vein line targets), ``data`` (a
trial's decoded images, masks and labels), ``step`` (one training step, one evaluation pass),
``mask_fit`` (does the attention map follow the ground-truth mask?), ``checkpoint``, ``trial``
(:func:`~mgfa_ray.train.trial.run_trial`: the epoch loop) and ``worker`` (what a reused trial worker
keeps and releases).
"""
