"""Fixtures shared by several test modules."""

import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(scope="session")
def sanity_data():
  """``(ds, popularity_recall)``: a small synthetic set with learnable structure for training sanity
  checks, and the validation recall@20 of ranking by item popularity (the bar a trained model must clear)."""
  data = pytest.importorskip("benchmarks.data.dataset")
  metrics = pytest.importorskip("benchmarks.training.metrics")
  ds = data.synthetic(
    n_users=300,
    n_items=200,
    n_interactions=6000,
    latent_dim=8,
    image_dim=16,
    text_dim=8,
    affinity_scale=4.0,
    popularity_exponent=0.3,
    seed=0,
  )
  popularity = jnp.asarray(np.bincount(ds.train.item, minlength=ds.n_items), jnp.float32)
  pop = metrics.evaluate(lambda u: jnp.broadcast_to(popularity, (u.shape[0], ds.n_items)), ds, "valid", ks=(20,))[
    "recall@20"
  ]
  return ds, pop
