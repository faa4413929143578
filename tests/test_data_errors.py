"""benchmarks.data on bad input: nothing silent, every error names the file (and the line, column or shape)."""

import io
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from benchmarks.data import dataset as data
from benchmarks.data.fingerprint import dataset_fingerprint

HEADER = b"userID\titemID\tx_label\n"
# Users 0 and 1 each with train/valid/test rows; items 0..3 (as in test_data.py).
GOOD = b"0\t0\t0\n0\t1\t1\n0\t2\t2\n1\t1\t0\n1\t3\t0\n1\t0\t1\n1\t2\t2\n"


def _write(directory: Path, content: bytes, features: dict | None = None) -> Path:
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "toy.inter").write_bytes(content)
  for modality, raw in (features or {}).items():
    (directory / f"{modality}_feat.npy").write_bytes(raw)
  return directory


def _npy(array, **kwargs) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array, **kwargs)
  return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# 1. A UTF-8 byte-order mark is dropped
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [HEADER, b"rating\tuserID\titemID\tx_label\n"], ids=["userID-first", "rating-first"])
def test_bom_inter_loads_like_without_bom(tmp_path, header):
  rows = GOOD if header == HEADER else b"".join(b"1.0\t" + line + b"\n" for line in GOOD.splitlines())
  plain = data.load_mmrec(_write(tmp_path / "plain", header + rows))
  bom = data.load_mmrec(_write(tmp_path / "bom", b"\xef\xbb\xbf" + header + rows))
  assert (bom.name, bom.n_users, bom.n_items) == (plain.name, plain.n_users, plain.n_items)
  assert dataset_fingerprint(bom) == dataset_fingerprint(plain)


# ---------------------------------------------------------------------------------------------------------------
# 2. Bytes that are not UTF-8
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "content, where",
  [
    (HEADER + b"0\t0\t0\n0\t\xff1\t1\n" + GOOD, r"line 3, column 'itemID': byte 0xff at byte offset 30 "),
    (b"user\xe9ID\titemID\tx_label\n" + GOOD, r"line 1: byte 0xe9 at byte offset 4 "),
    (HEADER + GOOD * 400 + b"1\t2\t\xe2\x82", r"line 2802, column 'x_label': byte 0xe2 at byte offset 16826 "),
  ],
  ids=["data-line", "header", "late-cut-sequence"],
)
def test_non_utf8_byte_names_file_line_column_and_offset(tmp_path, content, where):
  with pytest.raises(ValueError, match=r"toy\.inter, " + where + r".*not valid UTF-8") as info:
    data.load_mmrec(_write(tmp_path, content))
  assert not isinstance(info.value, UnicodeDecodeError)


# ---------------------------------------------------------------------------------------------------------------
# 3. The data path: a file that is not an .inter, or nothing at all
# ---------------------------------------------------------------------------------------------------------------


def test_path_is_a_file_or_does_not_exist(tmp_path):
  directory = _write(tmp_path / "toy", HEADER + GOOD, {"image": _npy(np.ones((4, 2), np.float32))})
  assert data.load_mmrec(directory / "toy.inter").n_items == 4  # the .inter file itself is fine
  with pytest.raises(
    NotADirectoryError,
    match=r"image_feat\.npy is a file, not an MMRec data directory or a "
    r"<name>\.inter file; its directory .* holds \['toy\.inter'\]",
  ):
    data.load_mmrec(directory / "image_feat.npy")
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(NotADirectoryError, match=r"notes\.txt is a file, not an MMRec data directory"):
    data.load(str(tmp_path / "notes.txt"))
  for missing in (tmp_path / "nope", directory / "other.inter"):
    with pytest.raises(FileNotFoundError, match=rf"{missing.name} does not exist"):
      data.load_mmrec(missing)


def test_load_raises_data_error_with_the_readers_message(tmp_path):
  # load() (what the commands call) raises DataError for everything that is the data's fault, with the reader's
  # own message (file, line, column); an OSError stays an instance of its type too.
  bad = _write(tmp_path / "bad", HEADER + b"0\t0\t0\n0\tx\t1\n" + GOOD)
  with pytest.raises(data.DataError, match=r"bad/toy\.inter, line 3, column 'itemID'") as info:
    data.load(str(bad))
  assert isinstance(info.value, ValueError)
  with pytest.raises(data.DataError, match=r"unknown synthetic preset 'nope'; choose one of"):
    data.load("synthetic:nope")
  for missing, kind in ((tmp_path / "nope", FileNotFoundError), (bad / "toy.inter" / "x", FileNotFoundError)):
    with pytest.raises(data.DataError, match="does not exist") as info:
      data.load(str(missing))
    assert isinstance(info.value, kind) and isinstance(info.value, ValueError)
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(data.DataError, match=r"notes\.txt is a file, not an MMRec data directory") as info:
    data.load(str(tmp_path / "notes.txt"))
  assert isinstance(info.value, NotADirectoryError)


# ---------------------------------------------------------------------------------------------------------------
# 4. Broken .npy feature files
# ---------------------------------------------------------------------------------------------------------------

_GOOD_NPY = _npy(np.ones((4, 2), np.float32))


@pytest.mark.parametrize(
  "raw, message",
  [
    (_GOOD_NPY[:-5], r"truncated: the header announces shape \(4, 2\) of float32 \(32 bytes of data\) but only 27"),
    (_GOOD_NPY[:20], r"corrupt \.npy header"),
    (_GOOD_NPY[:10] + b"{garbage}" + _GOOD_NPY[19:], r"corrupt \.npy header"),
    (b"\x93NUMPY\x09\x00" + _GOOD_NPY[8:], r"corrupt \.npy header .*version 9\.0"),
    (b"image,features\n1,2\n", r"not a \.npy file \(first bytes"),
    (b"", r"not a \.npy file \(an empty file"),
    (b"PK\x03\x04" + b"\x00" * 40, r"not a \.npy file \(a zip archive"),
    (_npy(np.full((4, 2), "a")), r"must be numeric.*, got dtype <U1"),
    (_npy(np.ones((4, 2), complex)), r"must be numeric.*, got dtype complex128"),
    (_npy(np.ones(4, np.float32)), r"must be 2-D \(n_items, dim\), got shape \(4,\)"),
    (_npy(np.ones((4, 2, 2), np.float32)), r"must be 2-D \(n_items, dim\), got shape \(4, 2, 2\)"),
    (_npy(np.ones((4, 0), np.float32)), r"zero-width feature table, shape \(4, 0\)"),
  ],
  ids=[
    "truncated-data",
    "truncated-header",
    "garbled-header",
    "bad-version",
    "text",
    "empty",
    "zip",
    "strings",
    "complex",
    "1-D",
    "3-D",
    "zero-width",
  ],
)
def test_broken_feature_file_names_file_and_problem(tmp_path, raw, message):
  directory = _write(tmp_path, HEADER + GOOD, {"image": raw})
  with pytest.raises(ValueError, match=r"image_feat\.npy: .*" + message):
    data.load_mmrec(directory)


class _Payload:
  """Unpickling this object creates a directory: a stand-in for code that a pickle could run."""

  def __init__(self, marker: Path):
    self.marker = marker

  def __reduce__(self):
    return os.mkdir, (str(self.marker),)


def test_object_feature_array_is_never_unpickled(tmp_path):
  marker = tmp_path / "unpickled"
  table = np.empty((4, 2), dtype=object)
  table[:] = _Payload(marker)
  directory = _write(tmp_path / "toy", HEADER + GOOD, {"image": _npy(table, allow_pickle=True)})
  with pytest.raises(
    ValueError,
    match=r"image_feat\.npy: dtype object holds Python objects, which are never "
    r"unpickled \(allow_pickle=False\)",
  ):
    data.load_mmrec(directory)
  assert not marker.exists()
  np.load(directory / "image_feat.npy", allow_pickle=True)  # the payload is live: unpickling runs it
  assert marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# 5. Sparse id spaces
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("column", ["userID", "itemID"])
def test_sparse_ids_refused_before_allocating(tmp_path, column):
  # 19 rows, 19 distinct ids up to 9 * 10^8: a model would need 9 * 10^8 rows.
  big = [k * 50_000_000 for k in range(19)]
  pairs = [(b, k % 3) for k, b in enumerate(big)] if column == "userID" else [(k % 3, b) for k, b in enumerate(big)]
  rows = "".join(f"{u}\t{i}\t{k % 3}\n" for k, (u, i) in enumerate(pairs)).encode()
  tracemalloc.start()
  try:
    with pytest.raises(
      ValueError,
      match=rf"toy\.inter, line 20, column '{column}': max id 900000000 but only "
      r"19 distinct ids; MMRec layout needs dense 0-based ids",
    ):
      data.load_mmrec(_write(tmp_path, HEADER + rows))
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 10 * 2**20


def test_dense_id_bound(tmp_path):
  # 4 distinct item ids: max id + 1 <= 2 * 4 + 1000 = 1008 loads, 1009 is refused.
  for top, ok in ((1007, True), (1008, False)):
    content = HEADER + GOOD.replace(b"\t3\t", f"\t{top}\t".encode())
    directory = _write(tmp_path / str(top), content)
    if ok:
      assert data.load_mmrec(directory).n_items == 1008
    else:
      with pytest.raises(ValueError, match=r"column 'itemID': max id 1008 but only 4 distinct ids"):
        data.load_mmrec(directory)
