"""mgfa-ray: Ray-distributed hyperparameter search for mask-guided ultra-fine-grained visual
categorization (Pan, Yu, Zhang, Gao, DICTA 2021).

Stages, one module each: :mod:`~mgfa_ray.data.manifest`, :mod:`~mgfa_ray.data.regions`,
:mod:`~mgfa_ray.detector.training`, :mod:`~mgfa_ray.masks`, :mod:`~mgfa_ray.train.trial` (with the model in
:mod:`~mgfa_ray.train.model`), :mod:`~mgfa_ray.search.driver` (its export in :mod:`~mgfa_ray.search.export`);
:mod:`~mgfa_ray.pipeline` chains them.
"""

__version__ = "0.1.0"
