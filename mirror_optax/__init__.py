"""mirror_optax: Mirror Gradient (Zhong, Huang et al., WWW 2024) for Optax.

``mirror_gradient`` wraps any optax optimizer so that every ``beta``-th step is a mirror step;
``mirror_optax.flatness`` holds generic tools (Hessian power iteration, loss landscapes) to measure
the flatness of the minimum a run reached; ``gradient_norm_penalty`` is the explicit
regulariser that MG applies implicitly (Theorem 3.2), as a baseline.
"""

from mirror_optax.flatness import (
  HessianEigenResult,
  filter_normalize_direction,
  hessian_vector_product,
  loss_landscape,
  random_directions,
  top_hessian_eigenvalue,
)
from mirror_optax.gradient_norm_penalty import gradient_norm_penalty
from mirror_optax.mirror_gradient import MirrorGradientState, mirror_gradient

__all__ = [
  "HessianEigenResult",
  "MirrorGradientState",
  "filter_normalize_direction",
  "gradient_norm_penalty",
  "hessian_vector_product",
  "loss_landscape",
  "mirror_gradient",
  "random_directions",
  "top_hessian_eigenvalue",
]
__version__ = "0.1.0"
