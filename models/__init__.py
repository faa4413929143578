"""Flax NNX recommenders faithful to MMRec: VBPR, LightGCN, BM3, LayerGCN, SelfCF (MMRec's SELFCFED_LGN).

Every model is built one way, from an :class:`Interactions` (the sizes, the training pairs and the item
feature tables, validated on construction)::

    model = Model(Interactions(n_users, n_items, train_user, train_item, features), rngs=nnx.Rngs(seed), **hparams)

where ``hparams`` are the model's keyword-only hyper-parameters (its constructor's signature gives their
names and defaults), and exposes

* ``requires``: the feature modalities it needs (``()`` for LightGCN, LayerGCN, SelfCF);
* ``loss(batch, key)``: scalar training loss; ``batch`` has int32 ``"user"``, ``"pos"``, ``"neg"``
  (BM3 and SelfCF ignore ``"neg"``); ``key`` is the PRNG key for any randomness (BM3 and SelfCF use
  it);
* ``embed()``: ``(U, I)`` with ``scores = U[uids] @ I.T``;
* ``scores(user_ids)``: ``(B, n_items)`` raw scores;
* optionally ``pre_epoch(key, epoch)``: per-epoch work on the model's constants (never its
  parameters), run by the trainer before every training epoch with a key derived from
  ``(seed, epoch)`` (:func:`benchmarks.training.loop.epoch_constants`); LayerGCN's edge dropout uses it.

Trainable arrays are ``nnx.Param`` (ID tables in ``nnx.Embed``; BM3's feature tables are
``FeatureTable(nnx.Param)``); the graph (``GraphConstant``) and VBPR's inputs (``FrozenFeatures``) are not.
"""

from __future__ import annotations

from models.bm3 import BM3
from models.common import FeatureTable, FrozenFeatures, GraphConstant, Interactions
from models.layergcn import LayerGCN
from models.lightgcn import LightGCN
from models.selfcf import SelfCF
from models.vbpr import VBPR

__all__ = [
  "BM3",
  "FeatureTable",
  "FrozenFeatures",
  "GraphConstant",
  "Interactions",
  "LayerGCN",
  "LightGCN",
  "MODELS",
  "SelfCF",
  "VBPR",
  "get_model",
]

MODELS: dict[str, type] = {"vbpr": VBPR, "lightgcn": LightGCN, "bm3": BM3, "layergcn": LayerGCN, "selfcf": SelfCF}


def get_model(name: str) -> type:
  """The model class registered under ``name`` (case-insensitive); ``ValueError`` if unknown."""
  key = name.lower() if isinstance(name, str) else name
  if key not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
  return MODELS[key]
