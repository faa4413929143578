"""Content fingerprints of data sets, so that results and checkpoints are never reused on other data.

A fingerprint is the SHA-256 of everything a training run reads from a :class:`~benchmarks.data.Dataset`:
its sizes, the (user, item) pairs of every split in order, and every feature table (modality name,
shape, dtype and bytes). It does not depend on the data set's name or on where the files lie, and it
covers the loader's own decisions (e.g. rows it drops), which a hash of the files would not.
"""

from __future__ import annotations

import hashlib

import numpy as np

from benchmarks.data.dataset import SPLITS, Dataset

__all__ = ["dataset_fingerprint"]


def dataset_fingerprint(ds: Dataset) -> str:
  """The hex SHA-256 content fingerprint of ``ds`` (computed once, then cached on the instance)."""
  cached = ds._cache.get("fingerprint")
  if cached is not None:
    return cached
  h = hashlib.sha256()
  h.update(f"n_users={ds.n_users};n_items={ds.n_items};".encode())
  for name in SPLITS:
    split = ds.split(name)
    h.update(f"{name}:{len(split)};".encode())
    h.update(np.ascontiguousarray(split.user, dtype="<i4").tobytes())
    h.update(np.ascontiguousarray(split.item, dtype="<i4").tobytes())
  for modality in sorted(ds.features):
    table = np.ascontiguousarray(ds.features[modality], dtype="<f4")
    h.update(f"feature:{modality}:{table.shape};".encode())
    h.update(table.tobytes())
  digest = h.hexdigest()
  ds._cache["fingerprint"] = digest
  return digest
