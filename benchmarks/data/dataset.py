r"""Interaction data sets in MMRec layout, and a synthetic multimodal generator.

A data set is a set of implicit-feedback pairs :math:`(u, i)` with user ids :math:`u \in [0, n_u)` and item ids
:math:`i \in [0, n_i)`, split into train / valid / test, plus optional per-item feature tables
:math:`F_m \in \mathbb{R}^{n_i \times d_m}` for each modality :math:`m` ("image", "text", ...).

**MMRec layout** (Zhou et al., "A Comprehensive Survey on Multimodal Recommender Systems", and the MMRec
toolbox, https://github.com/enoche/MMRec): a directory holding exactly one ``<name>.inter`` file -- tab separated,
one header line, of which the columns ``userID``, ``itemID`` and ``x_label`` (0 train, 1 valid, 2 test) are used
and all others ignored -- and zero or more ``<modality>_feat.npy`` tables whose row ``i`` describes item ``i``.
Ids are 0-based; ``n_users = max userID + 1`` and ``n_items = max itemID + 1``.

:func:`load_mmrec` takes the directory or the ``.inter`` file itself; a path that does not exist raises
:class:`FileNotFoundError` and a path to any other file :class:`NotADirectoryError` (it is a file, not an MMRec
directory). It is strict: malformed ids, labels and feature tables raise an error naming the file, the line
(1-based, counting the header as line 1) or row, and the column. The rules:

* ``.inter`` files are UTF-8 text; a leading byte-order mark (``EF BB BF``, as written by some editors and
  accepted by pandas and MMRec) is dropped. Any other byte that is not UTF-8 raises :class:`ValueError` naming
  the line, the column and the byte offset;
* ids must be dense: ``max id + 1 <= 2 * (number of distinct ids) + 1000`` for ``userID`` and for ``itemID``,
  else :class:`ValueError` (naming the line of the max id, the column, the max id and the distinct count). A model
  allocates ``max id + 1`` rows, so 19 rows with ids up to 10^9 would mean 10^9-row tables; this is checked
  before anything of that size is allocated. MMRec's own data are fully dense (Scientific, Baby, Sports and
  Clothing all have ``max id + 1 == distinct`` for users and items); the factor 2 still admits gaps from
  filtering a data set (up to half the ids unused, so at most one unused embedding row per used one) and the
  1000 admits small hand-made files with scattered ids;
* feature files must be ``.npy`` files written by ``numpy.save`` holding a 2-D ``(n_items, dim)`` float or int
  table with ``dim >= 1`` and finite values. The header is checked before any data are read: a file that is
  not an ``.npy`` (e.g. an ``.npz`` archive), a corrupt header, truncated data, an object dtype (never
  unpickled: ``allow_pickle=False``), a non-numeric dtype (strings, structured, complex), a 1-D or 3-D shape or
  a zero-width table raise :class:`ValueError` naming the file and its dtype or shape;
* duplicated ``(userID, itemID)`` rows are rejected (:class:`ValueError` naming the first line that repeats an
  earlier one, and that earlier line) instead of being silently merged, because a pair cannot be both a training
  positive and a held-out target;
* valid/test rows of users without any training row cannot be ranked by a collaborative model; they are dropped
  with a :class:`UserWarning` that counts users and rows (the ids keep their meaning, ``n_users`` is unchanged).

**Synthetic data** (:func:`synthetic`, :func:`synthetic_preset`): user and item latent factors
:math:`p_u, q_i \sim \mathcal{N}(0, d^{-1/2} I_d)` so that :math:`p_u^\top q_i` has unit variance, a Zipf
popularity prior :math:`\pi_i \approx (r_i + 1)^{-a}` (a discretised power law, sampled by inversion) over a
random item ranking :math:`r`, and per-user degrees
:math:`n_u = n_{\min} + \mathrm{Multinomial}` with log-normal activity weights (total fixed exactly). Each user's
items are drawn without replacement from (approximately) :math:`\pi_i \exp(s\, p_u^\top q_i)`: candidates are
proposed from :math:`\pi`, de-duplicated, and the top-:math:`n_u` by :math:`s\, p_u^\top q_i + G` with Gumbel
noise :math:`G` are kept (Gumbel-top-k; Kool et al., ICML 2019). Feature tables are noisy random projections of
the item factors, :math:`F_m = d^{-1/4} Q W_m + \sigma_m E` with :math:`W_m, E` standard normal, so modalities
carry (noisy) information about the items that ID-only models must learn from interactions alone.

The split follows MMRec's per-user rule as used for ``shared/data/scientific``: each user's interactions are put
in a random order; a user with ``n < 10`` interactions gets the last one as test and the one before as valid;
otherwise ``n // 10`` valid and ``floor(n / 10 + 1/2)`` test interactions are held out (about 20%).
"""

from __future__ import annotations

import dataclasses
import re
import types
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
  "SPLITS",
  "PRESETS",
  "DataError",
  "Split",
  "Dataset",
  "load_mmrec",
  "synthetic",
  "synthetic_preset",
  "write_mmrec",
  "load",
]

SPLITS: tuple[str, ...] = ("train", "valid", "test")
_LABELS = {"train": 0, "valid": 1, "test": 2}
_REQUIRED_COLUMNS = ("userID", "itemID", "x_label")
_FEATURE_SUFFIX = "_feat.npy"
_INT32_MAX = np.iinfo(np.int32).max
_ID_SLACK = 1000  # see _check_dense_ids
_ENCODING = "utf-8-sig"  # UTF-8; a leading byte-order mark is dropped (as pandas and MMRec do)
_NPY_MAGIC = b"\x93NUMPY"


class DataError(ValueError):
  """A data set that cannot be loaded through the data's fault, raised by :func:`load`: a path that does not
  exist or is not MMRec data, an unknown synthetic preset, a malformed ``.inter`` or feature file. The message is
  the reader's own, which names the file and, where it applies, the line and the column.

  An error that the reader raised as an :class:`OSError` (``FileNotFoundError``, ``NotADirectoryError``,
  ``PermissionError``, ...) stays an instance of that type too, so ``except FileNotFoundError`` still catches it.
  """


_OS_DATA_ERRORS: dict[type, type] = {}


def _as_data_error(e: Exception) -> DataError:
  """``e``'s message as a :class:`DataError` (that is also of ``e``'s type if ``e`` is an ``OSError``)."""
  if not isinstance(e, OSError):
    return DataError(str(e))
  kind = type(e)
  if kind not in _OS_DATA_ERRORS:
    _OS_DATA_ERRORS[kind] = type(f"DataError[{kind.__name__}]", (DataError, kind), {"__module__": __name__})
  return _OS_DATA_ERRORS[kind](str(e))


# --------------------------------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------------------------------


def _frozen_int32(a: Any, what: str) -> np.ndarray:
  arr = np.asarray(a)
  if arr.ndim != 1:
    raise ValueError(f"{what} must be 1-D, got shape {arr.shape}")
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{what} must hold integers, got dtype {arr.dtype}")
  if arr.size and (arr.min() < 0 or arr.max() > _INT32_MAX):
    raise ValueError(f"{what} must hold ids in [0, 2**31), got range [{arr.min()}, {arr.max()}]")
  out = arr.astype(np.int32, copy=False).view()
  out.flags.writeable = False
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One interaction split: parallel int32 arrays of user and item ids (read-only views)."""

  user: np.ndarray
  item: np.ndarray

  def __post_init__(self) -> None:
    user = _frozen_int32(self.user, "Split.user")
    item = _frozen_int32(self.item, "Split.item")
    if user.shape != item.shape:
      raise ValueError(f"Split.user and Split.item differ in length: {user.shape[0]} vs {item.shape[0]}")
    object.__setattr__(self, "user", user)
    object.__setattr__(self, "item", item)

  def __len__(self) -> int:
    return int(self.user.shape[0])

  def __repr__(self) -> str:
    return f"Split(n={len(self)})"


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """An implicit-feedback data set: train/valid/test splits and per-item feature tables.

  Attributes:
    name: data set name (the ``.inter`` file stem for loaded data).
    n_users: number of user ids (max id + 1); users may have no interactions at all.
    n_items: number of item ids (max id + 1).
    train, valid, test: the splits.
    features: modality -> float32 ``(n_items, dim)`` table; empty if the data set has none.

  Per-user views (:meth:`items_by_user`, :meth:`csr`) are computed once and cached on the instance; the
  arrays are read-only so the cache cannot go stale.
  """

  name: str
  n_users: int
  n_items: int
  train: Split
  valid: Split
  test: Split
  features: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  _cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

  def __post_init__(self) -> None:
    n_users, n_items = int(self.n_users), int(self.n_items)
    if n_users <= 0 or n_items <= 0:
      raise ValueError(f"n_users and n_items must be positive, got {n_users} and {n_items}")
    object.__setattr__(self, "n_users", n_users)
    object.__setattr__(self, "n_items", n_items)
    for split in SPLITS:
      s = getattr(self, split)
      if not isinstance(s, Split):
        raise TypeError(f"Dataset.{split} must be a Split, got {type(s).__name__}")
      if len(s) and s.user.max() >= n_users:
        raise ValueError(f"{split} split has user id {s.user.max()} >= n_users={n_users}")
      if len(s) and s.item.max() >= n_items:
        raise ValueError(f"{split} split has item id {s.item.max()} >= n_items={n_items}")
    feats = {}
    for modality, table in dict(self.features).items():
      arr = np.asarray(table)
      if arr.ndim != 2 or arr.shape[0] != n_items:
        raise ValueError(f"features[{modality!r}] must have shape (n_items={n_items}, dim), got {arr.shape}")
      arr = arr.astype(np.float32, copy=False).view()
      arr.flags.writeable = False
      feats[str(modality)] = arr
    object.__setattr__(self, "features", types.MappingProxyType(feats))

  def __repr__(self) -> str:
    feats = ", ".join(f"{m}: {a.shape[0]}x{a.shape[1]}" for m, a in self.features.items())
    return (
      f"Dataset(name={self.name!r}, n_users={self.n_users}, n_items={self.n_items}, "
      f"train={len(self.train)}, valid={len(self.valid)}, test={len(self.test)}, features={{{feats}}})"
    )

  def split(self, split: str) -> Split:
    """The :class:`Split` called ``split`` (one of ``"train"``, ``"valid"``, ``"test"``)."""
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return getattr(self, split)

  def csr(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Compressed per-user rows of ``split``: ``(indptr int64 (n_users + 1,), indices int32 (nnz,))``.

    The items of user ``u`` are ``indices[indptr[u]:indptr[u + 1]]``, sorted ascending. Cached.
    Raises ValueError if the split holds a ``(user, item)`` pair twice.
    """
    key = ("csr", split)
    if key not in self._cache:
      s = self.split(split)
      keys = s.user.astype(np.int64) * self.n_items + s.item
      keys = np.sort(keys)
      if keys.size > 1 and np.any(keys[1:] == keys[:-1]):
        first = int(keys[1:][keys[1:] == keys[:-1]][0])
        raise ValueError(
          f"{self.name}: the {split} split holds the pair (user {first // self.n_items}, "
          f"item {first % self.n_items}) more than once"
        )
      users = keys // self.n_items
      indptr = np.zeros(self.n_users + 1, dtype=np.int64)
      np.cumsum(np.bincount(users, minlength=self.n_users), out=indptr[1:])
      indices = (keys - users * self.n_items).astype(np.int32)
      indptr.flags.writeable = False
      indices.flags.writeable = False
      self._cache[key] = (indptr, indices)
    return self._cache[key]

  def items_by_user(self, split: str) -> list[np.ndarray]:
    """``n_users`` sorted unique int32 arrays: the items of each user in ``split`` (cached)."""
    key = ("items_by_user", split)
    if key not in self._cache:
      indptr, indices = self.csr(split)
      self._cache[key] = np.split(indices, indptr[1:-1])
    return self._cache[key]

  @property
  def train_items_by_user(self) -> list[np.ndarray]:
    return self.items_by_user("train")

  @property
  def valid_items_by_user(self) -> list[np.ndarray]:
    return self.items_by_user("valid")

  @property
  def test_items_by_user(self) -> list[np.ndarray]:
    return self.items_by_user("test")


# --------------------------------------------------------------------------------------------------------------
# Loading MMRec directories
# --------------------------------------------------------------------------------------------------------------


def _data_line_numbers(file: Path) -> list[int]:
  """1-based line numbers of the non-blank data lines (after the header); used for error messages only."""
  with open(file, encoding=_ENCODING, newline="") as f:
    f.readline()
    return [n for n, line in enumerate(f, start=2) if line.strip()]


def _line_of(file: Path, row: int) -> int:
  return _data_line_numbers(file)[row]


_INT_RE = re.compile(r"\+?[0-9]+")


def _parse_slowly(file: Path, columns: list[str], usecols: tuple[int, ...]) -> np.ndarray:
  """Line-by-line parser: returns the ``(n, 3)`` ids or raises a ValueError naming the bad line and column."""
  rows = []
  with open(file, encoding=_ENCODING, newline="") as f:
    f.readline()
    for lineno, line in enumerate(f, start=2):
      if not line.strip():
        continue
      fields = line.rstrip("\r\n").split("\t")
      if len(fields) != len(columns):
        raise ValueError(
          f"{file}, line {lineno}: expected {len(columns)} tab-separated fields (header {columns}), got {len(fields)}"
        )
      row = []
      for c in usecols:
        text = fields[c].strip()
        if not _INT_RE.fullmatch(text):
          kind = "negative" if re.fullmatch(r"-[0-9]+", text) else "non-integer"
          raise ValueError(
            f"{file}, line {lineno}, column {columns[c]!r}: {kind} value {text!r}; expected a non-negative integer"
          )
        row.append(int(text))
      rows.append(row)
  return np.asarray(rows, dtype=np.int64).reshape(-1, len(usecols))


def _not_utf8(file: Path) -> ValueError:
  """The error for a non-UTF-8 ``.inter`` file: the line, column and byte offset of the first bad byte."""
  raw = file.read_bytes()
  try:
    raw.decode("utf-8")
  except UnicodeDecodeError as e:
    start, reason = e.start, e.reason
  else:  # pragma: no cover - only called after a decoding error
    return ValueError(f"{file}: not valid UTF-8 text")
  before = raw[:start]
  lineno = len((before + b"x").splitlines())  # the line that holds byte ``start`` (1-based)
  line_start = max(before.rfind(b"\n"), before.rfind(b"\r")) + 1
  where = f"line {lineno}"
  if lineno > 1:  # the header decoded: name the column of the bad byte
    columns = [c.strip() for c in raw.splitlines()[0].decode(_ENCODING).split("\t")]
    field = before[line_start:].count(b"\t")
    if field < len(columns):
      where += f", column {columns[field]!r}"
  return ValueError(
    f"{file}, {where}: byte {raw[start]:#04x} at byte offset {start} (byte {start - line_start + 1} of the "
    f"line) is not valid UTF-8 ({reason}); .inter files must be UTF-8 text"
  )


def _read_inter(file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Parse the used columns of an ``.inter`` file into int64 ``(user, item, label)`` arrays."""
  try:
    return _parse_inter(file)
  except UnicodeDecodeError:
    raise _not_utf8(file) from None


def _parse_inter(file: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  with open(file, encoding=_ENCODING, newline="") as f:
    header = f.readline()
    columns = [c.strip() for c in header.rstrip("\r\n").split("\t")]
    missing = [c for c in _REQUIRED_COLUMNS if c not in columns]
    if not header.strip() or missing:
      raise ValueError(
        f"{file}, line 1: missing column(s) {missing or list(_REQUIRED_COLUMNS)} in the tab-separated "
        f"header {columns}; MMRec .inter files need {list(_REQUIRED_COLUMNS)}"
      )
    usecols = tuple(columns.index(c) for c in _REQUIRED_COLUMNS)
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("error")  # float-to-int parsing, empty input: take the strict path
        data = np.loadtxt(f, delimiter="\t", usecols=usecols, dtype=np.int64, ndmin=2, comments=None)
    except (ValueError, Warning):
      data = None
  if data is None or data.shape[1] != len(usecols):
    data = _parse_slowly(file, columns, usecols)

  user, item, label = (np.ascontiguousarray(data[:, j]) for j in range(3))
  for name, col in (("userID", user), ("itemID", item)):
    bad = np.flatnonzero(col < 0)
    if bad.size:
      raise ValueError(
        f"{file}, line {_line_of(file, bad[0])}, column {name!r}: negative id {col[bad[0]]}; "
        "ids must be 0-based non-negative integers"
      )
    if col.size and col.max() > _INT32_MAX:
      row = int(np.argmax(col))
      raise ValueError(f"{file}, line {_line_of(file, row)}, column {name!r}: id {col[row]} exceeds int32")
  bad = np.flatnonzero((label < 0) | (label > 2))
  if bad.size:
    raise ValueError(
      f"{file}, line {_line_of(file, bad[0])}, column 'x_label': value {label[bad[0]]} not in "
      "{0 (train), 1 (valid), 2 (test)}"
    )
  return user, item, label


def _check_dense_ids(file: Path, name: str, col: np.ndarray) -> None:
  """Refuse a sparse id space: ``max id + 1 > 2 * distinct + 1000`` (see the module docstring)."""
  n_ids = int(col.max()) + 1
  if n_ids <= 2 * col.size + _ID_SLACK:  # n_ids <= 2 * rows + slack: a small count table
    distinct = int(np.count_nonzero(np.bincount(col, minlength=n_ids)))
  else:  # never allocate anything of size max id here
    distinct = int(np.unique(col).size)
  if n_ids > 2 * distinct + _ID_SLACK:
    row = int(np.argmax(col))
    raise ValueError(
      f"{file}, line {_line_of(file, row)}, column {name!r}: max id {n_ids - 1} but only {distinct} distinct "
      f"ids; MMRec layout needs dense 0-based ids (max id + 1 <= 2 * distinct + {_ID_SLACK}), else a model "
      f"would allocate {n_ids} rows -- remap the ids to 0..{distinct - 1}"
    )


def _check_duplicates(file: Path, user: np.ndarray, item: np.ndarray, n_items: int) -> None:
  keys = user * n_items + item
  order = np.argsort(keys, kind="stable")  # equal keys keep file order
  sorted_keys = keys[order]
  dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
  if dup.size:
    later = order[dup + 1]  # a row that repeats an earlier row with the same key
    j = int(np.argmin(later))
    row, earlier = int(later[j]), int(order[dup[j]])
    lines = _data_line_numbers(file)
    raise ValueError(
      f"{file}, line {lines[row]}: duplicate interaction (userID {user[row]}, itemID {item[row]}) "
      f"already on line {lines[earlier]}; each (user, item) pair may appear once"
    )


def _check_finite_rows(file: Path, table: np.ndarray, block: int = 8192) -> None:
  for start in range(0, table.shape[0], block):
    ok = np.isfinite(table[start : start + block]).all(axis=1)
    if not ok.all():
      row = start + int(np.argmin(ok))
      raise ValueError(f"{file}: row {row} (item {row}) holds NaN or inf; features must be finite")


def _read_npy(file: Path, n_items: int) -> np.ndarray:
  """Read one ``.npy`` feature table; its header (dtype, shape, data size) is checked before any data is read."""
  fmt = np.lib.format
  with open(file, "rb") as f:
    head = f.read(len(_NPY_MAGIC))
    if head != _NPY_MAGIC:
      kind = (
        "an empty file" if not head else "a zip archive (.npz?)" if head.startswith(b"PK") else f"first bytes {head!r}"
      )
      raise ValueError(
        f"{file}: not a .npy file ({kind}; a .npy file starts with {_NPY_MAGIC!r}); save feature tables with numpy.save"
      )
    f.seek(0)
    try:
      version = fmt.read_magic(f)
      if version not in ((1, 0), (2, 0), (3, 0)):
        raise ValueError(f"unknown .npy format version {version[0]}.{version[1]}")
      read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
      shape, _, dtype = read_header(f)  # 3.0 has the layout of 2.0 (its header may also be UTF-8)
    except Exception as e:  # ValueError, or e.g. tokenize.TokenError from parsing a garbled header
      raise ValueError(f"{file}: corrupt .npy header ({type(e).__name__}: {e})") from None
    if dtype.hasobject:
      raise ValueError(
        f"{file}: dtype {dtype} holds Python objects, which are never unpickled (allow_pickle=False); "
        "feature tables must be numeric"
      )
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
      raise ValueError(f"{file}: feature table must be numeric (float or int), got dtype {dtype}")
    if len(shape) != 2:
      raise ValueError(f"{file}: feature table must be 2-D (n_items, dim), got shape {shape}")
    if shape[1] == 0:
      raise ValueError(
        f"{file}: zero-width feature table, shape {shape}; a modality needs at least one feature "
        "column (remove the file to load no such features)"
      )
    if shape[0] != n_items:
      raise ValueError(
        f"{file}: {shape[0]} feature rows but the interactions define n_items={n_items} "
        "(max itemID + 1); row i must describe item i"
      )
    expected = shape[0] * shape[1] * dtype.itemsize
    available = file.stat().st_size - f.tell()
    if available < expected:
      raise ValueError(
        f"{file}: truncated: the header announces shape {shape} of {dtype} ({expected} bytes of data) "
        f"but only {available} bytes follow it"
      )
    f.seek(0)
    try:
      return fmt.read_array(f, allow_pickle=False)
    except ValueError as e:  # pragma: no cover - header and size were checked above
      raise ValueError(f"{file}: unreadable .npy data: {e}") from None


def _read_features(directory: Path, n_items: int) -> dict[str, np.ndarray]:
  features = {}
  for file in sorted(directory.glob(f"*{_FEATURE_SUFFIX}")):
    modality = file.name[: -len(_FEATURE_SUFFIX)]
    table = _read_npy(file, n_items).astype(np.float32, copy=False)
    _check_finite_rows(file, table)
    features[modality] = table
  return features


def _find_inter(path: Path) -> Path:
  if path.is_file():
    if path.suffix == ".inter":
      return path
    inters = sorted(p.name for p in path.parent.glob("*.inter"))
    hint = f"; its directory {path.parent} holds {inters}" if inters else ""
    raise NotADirectoryError(f"{path} is a file, not an MMRec data directory or a <name>.inter file{hint}")
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist (MMRec data directory or .inter file not found)")
  if not path.is_dir():
    raise NotADirectoryError(f"{path} is neither a directory nor a regular file")
  inters = sorted(path.glob("*.inter"))
  if not inters:
    raise FileNotFoundError(f"no <name>.inter file in {path}")
  if len(inters) > 1:
    raise ValueError(f"more than one .inter file in {path}: {[p.name for p in inters]}; expected exactly one")
  return inters[0]


def load_mmrec(path: str | Path) -> Dataset:
  """Load a data set in MMRec layout (see the module docstring).

  Args:
    path: the directory holding ``<name>.inter`` and optional ``<modality>_feat.npy`` files (or the
      ``.inter`` file itself).

  Returns:
    a :class:`Dataset` named ``<name>``; each split keeps the file order of its rows.

  Raises:
    FileNotFoundError: ``path`` does not exist, or the directory holds no ``.inter`` file.
    NotADirectoryError: ``path`` is a file other than a ``.inter`` file (or neither a file nor a directory).
    ValueError: several ``.inter`` files, bytes that are not UTF-8, a missing column, a non-integer or negative
      id, a sparse id space, an ``x_label`` outside {0, 1, 2}, a duplicated ``(userID, itemID)`` pair, a
      feature file that is not a readable ``.npy`` table (not an npy, corrupt header, truncated data,
      object or non-numeric dtype, not 2-D, zero width), a feature table whose row count differs from
      ``n_items`` or that holds NaN/inf, or a split left empty.

  Warns:
    UserWarning: when valid/test rows of users with no training row are dropped.
  """
  inter = _find_inter(Path(path))
  user, item, label = _read_inter(inter)
  if user.size == 0:
    raise ValueError(f"{inter}: no interactions after the header; the 'train' split is empty")
  _check_dense_ids(inter, "userID", user)
  _check_dense_ids(inter, "itemID", item)
  n_users, n_items = int(user.max()) + 1, int(item.max()) + 1
  _check_duplicates(inter, user, item, n_items)

  has_train = np.zeros(n_users, dtype=bool)
  has_train[user[label == 0]] = True
  orphan = (label > 0) & ~has_train[user]
  if orphan.any():
    warnings.warn(
      f"{inter}: dropped {np.unique(user[orphan]).size} user(s) with valid/test interactions but no "
      f"training interaction ({int(np.sum(orphan & (label == 1)))} valid and "
      f"{int(np.sum(orphan & (label == 2)))} test rows)",
      UserWarning,
      stacklevel=2,
    )
  splits = {}
  for split, code in _LABELS.items():
    rows = (label == code) & ~orphan
    if not rows.any():
      raise ValueError(f"{inter}: the {split!r} split is empty (no usable rows with x_label={code})")
    splits[split] = Split(user[rows], item[rows])
  return Dataset(
    name=inter.stem,
    n_users=n_users,
    n_items=n_items,
    features=_read_features(inter.parent, n_items),
    **splits,
  )


def write_mmrec(ds: Dataset, path: str | Path) -> None:
  """Write ``ds`` to directory ``path`` in MMRec layout so that :func:`load_mmrec` returns it unchanged.

  Rows are written train, then valid, then test, each in split order; columns ``userID itemID x_label``;
  features go to ``<modality>_feat.npy`` (float32). The directory is created if needed. Raises
  FileExistsError if it already holds other ``.inter`` or ``*_feat.npy`` files (loading would pick them up).
  """
  directory = Path(path)
  name = re.sub(r"[^\w.-]", "_", ds.name) or "dataset"
  targets = {f"{name}.inter"} | {f"{m}{_FEATURE_SUFFIX}" for m in ds.features}
  if directory.exists():
    stale = [
      p.name for p in [*directory.glob("*.inter"), *directory.glob(f"*{_FEATURE_SUFFIX}")] if p.name not in targets
    ]
    if stale:
      raise FileExistsError(f"{directory} already holds {sorted(stale)}; write to an empty directory")
  directory.mkdir(parents=True, exist_ok=True)
  table = np.concatenate(
    [
      np.stack([s.user, s.item, np.full(len(s), code, dtype=np.int32)], axis=1)
      for s, code in ((ds.split(n), c) for n, c in _LABELS.items())
    ]
  )
  with open(directory / f"{name}.inter", "w", encoding="utf-8", newline="\n") as f:
    f.write("\t".join(_REQUIRED_COLUMNS) + "\n")
    np.savetxt(f, table, fmt="%d", delimiter="\t")
  for modality, features in ds.features.items():
    np.save(directory / f"{modality}{_FEATURE_SUFFIX}", np.asarray(features, dtype=np.float32))


# --------------------------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
  # unit tests: a few milliseconds
  "tiny": dict(n_users=60, n_items=40, n_interactions=600, latent_dim=8, image_dim=16, text_dim=8),
  # the default comparison (3 models x 3 methods in about 2 minutes on 2 CPU cores)
  "default": dict(n_users=1000, n_items=500, n_interactions=15_000, latent_dim=16, image_dim=64, text_dim=32),
  # shapes of the paper's Amazon data sets (features: image 4096-d, text 384-d)
  "baby": dict(n_users=19_445, n_items=7_050, n_interactions=160_792, image_dim=4096, text_dim=384),
  "sports": dict(n_users=35_598, n_items=18_357, n_interactions=296_337, image_dim=4096, text_dim=384),
  "clothing": dict(n_users=39_387, n_items=23_033, n_interactions=237_488, image_dim=4096, text_dim=384),
  "electronics": dict(n_users=192_403, n_items=63_001, n_interactions=1_689_188, image_dim=4096, text_dim=384),
}


def _user_degrees(
  rng: np.random.Generator, n_users: int, n_interactions: int, minimum: int, maximum: int, spread: float
) -> np.ndarray:
  """Degrees ``>= minimum`` and ``<= maximum`` summing exactly to ``n_interactions`` (heavy-tailed)."""
  activity = rng.lognormal(0.0, spread, n_users)
  degree = np.full(n_users, minimum, dtype=np.int64)
  remaining = n_interactions - minimum * n_users
  while remaining > 0:
    weights = activity * (degree < maximum)
    degree += rng.multinomial(remaining, weights / weights.sum())
    remaining = int(np.sum(np.maximum(degree - maximum, 0)))
    np.minimum(degree, maximum, out=degree)
  return degree


def _sum_of_products(pairs, out: np.ndarray | None = None) -> np.ndarray:
  """``sum_k x_k * y_k`` over ``pairs = [(x_0, y_0), ...]`` (broadcasting arrays), float32, with one correctly
  rounded multiply and add per term in a fixed order; written to ``out`` if given.

  The synthetic generator's only reductions go through here rather than BLAS (``matmul``) or numpy's SIMD
  ``einsum``: those pick kernels by CPU (blocking, FMA, vector width), so the same seed gave different bits on
  different machines -- and a different data fingerprint, so CI on another CPU failed the fingerprint test.
  Elementwise IEEE operations give the same bits on every CPU.
  """
  acc, term = out, None
  for i, (x, y) in enumerate(pairs):
    if i == 0:
      acc = np.multiply(x, y, dtype=np.float32, out=acc)
    else:
      term = np.multiply(x, y, dtype=np.float32, out=term)
      np.add(acc, term, out=acc)
  return acc


def _rowwise_dot(a: np.ndarray, b: np.ndarray, rows_a: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
  out = np.empty(rows_a.shape[0], dtype=np.float32)
  step = 1 << 20
  for s in range(0, rows_a.shape[0], step):
    ra, rb = a[rows_a[s : s + step]], b[rows_b[s : s + step]]
    out[s : s + step] = _sum_of_products((ra[:, k], rb[:, k]) for k in range(a.shape[1]))
  return out


@dataclasses.dataclass(frozen=True)
class _PowerLawPrior:
  r"""Item popularity: the item of popularity rank :math:`r` has probability :math:`(G(r+1) - G(r)) / G(n)`.

  :math:`G(x) = ((1+x)^{1-a} - 1) / (1-a)` (``log(1+x)`` for :math:`a = 1`) integrates :math:`(1+x)^{-a}`, so
  the prior is a discretised power law, :math:`\approx (r+1)^{-a}`, that inversion samples exactly in O(1).
  """

  ranking: np.ndarray  # item id at each popularity rank
  exponent: float

  def _g(self, x):
    b = 1.0 - self.exponent
    return np.log1p(x) if abs(b) < 1e-9 else np.expm1(b * np.log1p(x)) / b

  def _g_inv(self, y):
    b = 1.0 - self.exponent
    return np.expm1(y) if abs(b) < 1e-9 else np.expm1(np.log1p(b * y) / b)

  def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
    n = self.ranking.shape[0]
    rank = np.floor(self._g_inv(rng.random(size) * self._g(float(n)))).astype(np.int64)
    return self.ranking[np.clip(rank, 0, n - 1)]

  def log_prob(self) -> np.ndarray:
    n = self.ranking.shape[0]
    edges = self._g(np.arange(n + 1, dtype=np.float64))
    out = np.empty(n)
    out[self.ranking] = np.log(np.diff(edges) / edges[-1])
    return out


def _draw_items(
  rng: np.random.Generator,
  degree: np.ndarray,
  user_factors: np.ndarray,
  item_factors: np.ndarray,
  prior: _PowerLawPrior,
  affinity_scale: float,
  candidate_factor: float,
) -> tuple[np.ndarray, np.ndarray]:
  """Per user, ``degree[u]`` distinct items by Gumbel-top-k over popularity-proposed candidates."""
  n_users, n_items = degree.shape[0], prior.ranking.shape[0]
  pending = np.flatnonzero(degree > 0)
  chosen_u, chosen_i = [], []
  for attempt in range(4):
    if pending.size == 0:
      break
    if attempt < 3:  # propose from the popularity prior, with replacement, then de-duplicate
      n_cand = np.ceil(candidate_factor * 2**attempt * degree[pending]).astype(np.int64) + 4
      cu = np.repeat(pending, n_cand)
      ci = prior.sample(rng, cu.size)
      keys = cu * n_items + ci
      keys.sort()  # de-duplicate (a plain sort is much faster than np.unique's hash path)
      keys = keys[np.r_[True, keys[1:] != keys[:-1]]]
      cu, ci = keys // n_items, keys % n_items
      bias = 0.0
    else:  # last resort for users close to n_items: every item is a candidate
      cu = np.repeat(pending, n_items)
      ci = np.tile(np.arange(n_items), pending.size)
      bias = prior.log_prob()[ci]
    score = affinity_scale * _rowwise_dot(user_factors, item_factors, cu, ci) + bias + rng.gumbel(size=cu.size)
    available = np.bincount(cu, minlength=n_users)
    enough = available >= degree
    keep = enough[cu]
    cu, ci, score = cu[keep], ci[keep], score[keep]
    # by user, best score first: one sort of user * 2**32 + (descending rank of the score in 32 bits)
    lo, hi = score.min(), score.max()
    quantised = ((hi - score) * ((2**32 - 1) / max(hi - lo, 1e-12))).astype(np.int64)
    order = np.argsort(cu * 2**32 + quantised)
    cu, ci = cu[order], ci[order]
    starts = np.cumsum(available * enough) - available * enough
    rank = np.arange(cu.size) - starts[cu]
    top = rank < degree[cu]
    chosen_u.append(cu[top])
    chosen_i.append(ci[top])
    pending = pending[~enough[pending]]
  if pending.size:  # pragma: no cover - impossible: the last attempt offers every item
    raise RuntimeError(f"could not draw items for {pending.size} users")
  return np.concatenate(chosen_u), np.concatenate(chosen_i)


def _split_labels(rng: np.random.Generator, user: np.ndarray, degree: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Random per-user order and MMRec-rule labels; returns (order, label) with rows sorted by (user, time)."""
  order = np.argsort(user.astype(np.int64) * 2**32 + rng.integers(0, 2**32, user.size))
  u = user[order]
  starts = np.cumsum(degree) - degree
  rank = np.arange(u.size) - starts[u]
  n = degree[u]
  n_valid = np.where(n < 10, 1, n // 10)
  n_test = np.where(n < 10, 1, (n + 5) // 10)
  label = np.where(rank < n - n_valid - n_test, 0, np.where(rank < n - n_test, 1, 2))
  return order, label


def _projected_features(
  rng: np.random.Generator, item_factors: np.ndarray, dim: int, noise: float, block: int = 4096, rows: int = 128
) -> np.ndarray:
  latent = item_factors.shape[1]
  projection = rng.standard_normal((latent, dim), dtype=np.float32) / np.float32(latent**0.25)
  out = np.empty((item_factors.shape[0], dim), dtype=np.float32)
  for s in range(0, out.shape[0], block):
    chunk = out[s : s + block]
    for r in range(s, min(s + block, out.shape[0]), rows):  # cache-sized slabs (the sum is elementwise)
      f = item_factors[r : r + rows]
      _sum_of_products(((f[:, k : k + 1], projection[k]) for k in range(latent)), out=out[r : r + rows])
    chunk += np.float32(noise) * rng.standard_normal(chunk.shape, dtype=np.float32)
  return out


def synthetic(
  *,
  n_users: int = 1000,
  n_items: int = 500,
  n_interactions: int = 15_000,
  latent_dim: int = 16,
  image_dim: int = 64,
  text_dim: int = 32,
  image_noise: float = 1.0,
  text_noise: float = 0.7,
  affinity_scale: float = 3.0,
  popularity_exponent: float = 0.5,
  activity_spread: float = 1.0,
  min_user_interactions: int = 5,
  max_user_interactions: int | None = None,
  candidate_factor: float = 10.0,
  seed: int = 0,
  name: str = "synthetic",
) -> Dataset:
  """A deterministic synthetic multimodal data set with learnable structure (see the module docstring).

  Args:
    n_users, n_items, n_interactions: shape; the total is met exactly.
    latent_dim: dimension of the hidden user/item factors.
    image_dim, text_dim: feature widths of the "image" and "text" modalities (0 leaves a modality out).
    image_noise, text_noise: standard deviation of the feature noise (the signal has unit variance).
    affinity_scale: inverse temperature :math:`s` of the user-item affinity (0: popularity only).
    popularity_exponent: power-law exponent :math:`a` of the item popularity prior (0: uniform).
    activity_spread: log-normal sigma of user activity (heavier tail when larger).
    min_user_interactions: every user gets at least this many interactions (>= 3, so each keeps a training
      item after the valid/test hold-out).
    max_user_interactions: cap on a user's degree; default ``max(min, n_items // 2)``.
    candidate_factor: candidates proposed per wanted item (quality/speed of the Gumbel-top-k draw).
    seed: the generator seed; equal arguments give equal data sets.
    name: the data set name.
  """
  if min(n_users, n_items) <= 0:
    raise ValueError(f"n_users and n_items must be positive, got {n_users} and {n_items}")
  if min_user_interactions < 3:
    raise ValueError(f"min_user_interactions must be >= 3, got {min_user_interactions}")
  cap = max_user_interactions if max_user_interactions is not None else max(min_user_interactions, n_items // 2)
  if not min_user_interactions <= cap < n_items:
    raise ValueError(
      f"need min_user_interactions <= max_user_interactions < n_items, got {min_user_interactions}, {cap}, {n_items}"
    )
  if not min_user_interactions * n_users <= n_interactions <= cap * n_users:
    raise ValueError(
      f"n_interactions={n_interactions} must lie in [{min_user_interactions * n_users}, {cap * n_users}] "
      f"for {n_users} users with {min_user_interactions}..{cap} interactions each"
    )
  if min(image_dim, text_dim, latent_dim) < 0 or latent_dim == 0:
    raise ValueError("latent_dim must be positive and image_dim, text_dim non-negative")

  rng_factors, rng_degree, rng_items, rng_split, rng_feat = (
    np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)
  )
  scale = np.float32(latent_dim**-0.25)
  user_factors = rng_factors.standard_normal((n_users, latent_dim), dtype=np.float32) * scale
  item_factors = rng_factors.standard_normal((n_items, latent_dim), dtype=np.float32) * scale
  prior = _PowerLawPrior(rng_factors.permutation(n_items), float(popularity_exponent))

  degree = _user_degrees(rng_degree, n_users, n_interactions, min_user_interactions, cap, activity_spread)
  user, item = _draw_items(rng_items, degree, user_factors, item_factors, prior, affinity_scale, candidate_factor)
  order, label = _split_labels(rng_split, user, degree)
  user, item = user[order], item[order]
  splits = {split: Split(user[label == code], item[label == code]) for split, code in _LABELS.items()}

  features = {}
  for modality, dim, noise in (("image", image_dim, image_noise), ("text", text_dim, text_noise)):
    child = np.random.default_rng(rng_feat.integers(2**63))  # independent of the other modality's width
    if dim:
      features[modality] = _projected_features(child, item_factors, dim, noise)
  return Dataset(name=name, n_users=n_users, n_items=n_items, features=features, **splits)


def synthetic_preset(name: str, seed: int = 0, *, scale: float = 1.0, **overrides: Any) -> Dataset:
  """A :func:`synthetic` data set of a named shape (see :data:`PRESETS`).

  Args:
    name: a key of :data:`PRESETS` ("tiny", "default", "baby", "sports", "clothing", "electronics").
    seed: generator seed.
    scale: multiplies ``n_users``, ``n_items`` and ``n_interactions`` (e.g. 0.01 for a scaled-down
      Electronics shape in tests); feature widths are kept.
    **overrides: any other :func:`synthetic` argument, e.g. ``image_dim=0`` to skip the image table.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown synthetic preset {name!r}; choose one of {sorted(PRESETS)}")
  kwargs = dict(PRESETS[name])
  if scale != 1.0:
    if scale <= 0:
      raise ValueError(f"scale must be positive, got {scale}")
    for key in ("n_users", "n_items", "n_interactions"):
      kwargs[key] = max(1, round(kwargs[key] * scale))
  kwargs.update(overrides)
  kwargs.setdefault("name", f"synthetic-{name}" if scale == 1.0 else f"synthetic-{name}-x{scale:g}")
  return synthetic(seed=seed, **kwargs)


def load(spec: str, *, seed: int = 0) -> Dataset:
  """Load a data set from a spec string.

  ``"synthetic"`` is the "default" preset, ``"synthetic:<preset>"`` a named preset (with ``seed``), anything
  else a directory (or ``.inter`` file) in MMRec layout.

  Raises:
    DataError: the data cannot be loaded (the message names the file, line and column, or the preset); an
      ``OSError`` of the reader stays an instance of its own type too (e.g. ``FileNotFoundError``).
  """
  try:
    if spec == "synthetic":
      return synthetic_preset("default", seed=seed)
    if spec.startswith("synthetic:"):
      return synthetic_preset(spec.split(":", 1)[1], seed=seed)
    return load_mmrec(spec)
  except DataError:
    raise
  except (OSError, ValueError) as e:
    raise _as_data_error(e) from e
