"""mgfa-ray: Ray-distributed hyperparameter search for mask-guided ultra-fine-grained visual
categorization (Pan, Yu, Zhang, Gao, DICTA 2021).

Stages, one module each: :mod:`~mgfa_ray.manifest`, :mod:`~mgfa_ray.regions`,
:mod:`~mgfa_ray.detector`, :mod:`~mgfa_ray.masks`, :mod:`~mgfa_ray.trial` (with the model in
:mod:`~mgfa_ray.model`), :mod:`~mgfa_ray.search` (its export in :mod:`~mgfa_ray.export`);
:mod:`~mgfa_ray.pipeline` chains them.
"""

__version__ = "0.1.0"
