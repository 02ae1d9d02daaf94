"""itl_ray: what makes ImageNet good for transfer learning, as Ray Tune sweeps tracked in MLflow."""

__version__ = "0.1.0"
