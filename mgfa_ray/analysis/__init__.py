"""What the runs show: the ablation (paper Table III: rows × activations × seeds, ``ablation``), one
configuration over seeds against the backbone (``seeds``), their statistics (``stats``: confidence
intervals, paired differences), class activation maps (``cam``, paper Fig. 4) and mask figures
(``mask_view``, paper Fig. 3).
"""
