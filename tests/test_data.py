"""Tests for benchmarks.data: MMRec loading (real and malformed files), synthetic data, round trips."""

import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.data import dataset as data
from benchmarks.training import metrics

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
HEADER = "userID\titemID\tx_label\n"


def _require(name):
  path = DATA_ROOT / name
  if not (path / f"{name}.inter").is_file():
    pytest.skip(f"real data set {name!r} not found under {DATA_ROOT}")
  return path


def _write(directory: Path, rows: str, header: str = HEADER, name: str = "toy") -> Path:
  directory.mkdir(parents=True, exist_ok=True)
  (directory / f"{name}.inter").write_text(header + rows)
  return directory


# Users 0 and 1 each with train/valid/test rows; items 0..3.
GOOD = "0\t0\t0\n0\t1\t1\n0\t2\t2\n1\t1\t0\n1\t3\t0\n1\t0\t1\n1\t2\t2\n"


# ---------------------------------------------------------------------------------------------------------------
# Real data (shared/data/README.md)
# ---------------------------------------------------------------------------------------------------------------


def test_real_scientific_counts():
  # README: 2,928 users, 1,585 items, 13,615 / 2,951 / 3,002 rows, text and image 1585x512. Two users have no
  # training row (1 with one valid row; 1 with one valid and one test row): they are dropped with a warning.
  with pytest.warns(UserWarning, match=r"dropped 2 user\(s\).*2 valid and 1 test rows"):
    ds = data.load_mmrec(_require("scientific"))
  assert (ds.name, ds.n_users, ds.n_items) == ("scientific", 2928, 1585)
  assert (len(ds.train), len(ds.valid) + 2, len(ds.test) + 1) == (13_615, 2_951, 3_002)
  assert {m: f.shape for m, f in ds.features.items()} == {"image": (1585, 512), "text": (1585, 512)}
  assert all(f.dtype == np.float32 for f in ds.features.values())


def test_real_baby_counts():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ds = data.load_mmrec(_require("baby"))
  assert (ds.name, ds.n_users, ds.n_items) == ("baby", 19_445, 7_050)
  assert (len(ds.train), len(ds.valid), len(ds.test)) == (119_674, 20_559, 20_559)
  assert dict(ds.features) == {}
  assert data.load(str(DATA_ROOT / "baby")).n_users == 19_445


@pytest.mark.parametrize(
  "spec, digest",
  [
    ("scientific", "c2c0414ff0f601737d347aa50bd1711739a6774ff2a2cfec63d416da6cdc0808"),
    ("synthetic:tiny", "7a42e2855e8a0f4cdfa9148fe03bd070d1fd29a368a069f6f96cb79067d59378"),
    ("synthetic:default", "f25a554a9028320bb09d4b6a8324937f0231d1a05680c58a244b7fe05239ba79"),
  ],
)
def test_content_fingerprints_unchanged(spec, digest):
  # Valid data must keep loading bit-identically (results and checkpoints carry these content hashes).
  from benchmarks.data.fingerprint import dataset_fingerprint

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Scientific drops two users with a warning (see above)
    ds = data.load(spec if spec.startswith("synthetic") else str(_require(spec)))
  assert dataset_fingerprint(ds) == digest


def test_synthetic_data_use_no_cpu_dependent_reduction(monkeypatch):
  """The generator's bits must not depend on the CPU: BLAS (matmul / dot) and numpy's SIMD einsum pick
  their kernels by CPU, and once gave another CI machine other synthetic data (another fingerprint)."""
  ref = data.synthetic(n_users=60, n_items=40, n_interactions=600, latent_dim=4, image_dim=8, text_dim=3)

  def refuse(*args, **kwargs):
    raise AssertionError("the synthetic generator called a CPU-dependent reduction")

  for name in ("matmul", "dot", "einsum", "inner", "tensordot", "vdot"):
    monkeypatch.setattr(np, name, refuse)
  again = data.synthetic(n_users=60, n_items=40, n_interactions=600, latent_dim=4, image_dim=8, text_dim=3)
  monkeypatch.undo()
  for split in ("train", "valid", "test"):
    np.testing.assert_array_equal(getattr(again, split).user, getattr(ref, split).user)
    np.testing.assert_array_equal(getattr(again, split).item, getattr(ref, split).item)
  # and the same features, bit for bit
  for modality, dim in (("image", 8), ("text", 3)):
    assert again.features[modality].shape == (40, dim)
    np.testing.assert_array_equal(again.features[modality], ref.features[modality])


def test_sum_of_products_matches_a_float64_reference():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((50, 16)).astype(np.float32)
  b = rng.standard_normal((16, 30)).astype(np.float32)
  got = data._sum_of_products((a[:, k : k + 1], b[k]) for k in range(16))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, a.astype(np.float64) @ b.astype(np.float64), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Dataset behaviour
# ---------------------------------------------------------------------------------------------------------------


def test_load_small_file_and_items_by_user(tmp_path):
  ds = data.load_mmrec(_write(tmp_path, GOOD))
  assert (ds.name, ds.n_users, ds.n_items) == ("toy", 2, 4)
  np.testing.assert_array_equal(ds.train.user, [0, 1, 1])  # file order kept
  np.testing.assert_array_equal(ds.train.item, [0, 1, 3])
  assert ds.train.user.dtype == np.int32 and len(ds.valid) == 2 and len(ds.test) == 2
  by_user = ds.items_by_user("train")
  assert [list(a) for a in by_user] == [[0], [1, 3]]
  assert by_user is ds.train_items_by_user  # cached
  assert [list(a) for a in ds.test_items_by_user] == [[2], [2]]
  assert ds.features == {}
  with pytest.raises(ValueError, match="split must be one of"):
    ds.items_by_user("training")


def test_extra_columns_ignored_and_any_column_order(tmp_path):
  rows = "".join(f"{u}\t{i}\t1.0\t{l}\t17\n" for u, i, l in (line.split("\t") for line in GOOD.strip().split("\n")))
  ds = data.load_mmrec(_write(tmp_path, rows, header="userID\titemID\trating\tx_label\ttimestamp\n"))
  reference = data.load_mmrec(_write(tmp_path / "ref", GOOD))
  for split in data.SPLITS:
    np.testing.assert_array_equal(ds.split(split).item, reference.split(split).item)
  swapped = "".join(f"{l}\t{i}\t{u}\n" for u, i, l in (line.split("\t") for line in GOOD.strip().split("\n")))
  ds = data.load_mmrec(_write(tmp_path / "swapped", swapped, header="x_label\titemID\tuserID\n"))
  np.testing.assert_array_equal(ds.train.user, reference.train.user)


def test_features_loaded_by_modality(tmp_path):
  directory = _write(tmp_path, GOOD)
  np.save(directory / "image_feat.npy", np.arange(8, dtype=np.float64).reshape(4, 2))
  np.save(directory / "text_feat.npy", np.ones((4, 3), dtype=np.float32))
  ds = data.load_mmrec(directory)
  assert {m: (f.shape, f.dtype) for m, f in ds.features.items()} == {
    "image": ((4, 2), np.float32),
    "text": ((4, 3), np.float32),
  }


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_missing_directory_or_inter_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    data.load_mmrec(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match=r"no <name>\.inter"):
    data.load_mmrec(tmp_path)


def test_several_inter_files(tmp_path):
  _write(tmp_path, GOOD, name="a")
  _write(tmp_path, GOOD, name="b")
  with pytest.raises(ValueError, match=r"more than one \.inter.*a\.inter.*b\.inter"):
    data.load_mmrec(tmp_path)


def test_missing_column(tmp_path):
  with pytest.raises(ValueError, match=r"toy\.inter, line 1: missing column\(s\) \['x_label'\]"):
    data.load_mmrec(_write(tmp_path, "0\t0\n", header="userID\titemID\n"))


def test_non_integer_id(tmp_path):
  with pytest.raises(ValueError, match=r"toy\.inter, line 3, column 'itemID': non-integer value '1\.5'"):
    data.load_mmrec(_write(tmp_path, "0\t0\t0\n0\t1.5\t1\n"))
  with pytest.raises(ValueError, match=r"line 2, column 'userID': non-integer value 'abc'"):
    data.load_mmrec(_write(tmp_path, "abc\t0\t0\n"))


def test_negative_id(tmp_path):
  with pytest.raises(ValueError, match=r"toy\.inter, line 4, column 'userID': negative id -1"):
    data.load_mmrec(_write(tmp_path, "0\t0\t0\n0\t1\t1\n-1\t2\t2\n"))


def test_wrong_field_count(tmp_path):
  with pytest.raises(ValueError, match=r"line 3: expected 3 tab-separated fields"):
    data.load_mmrec(_write(tmp_path, "0\t0\t0\n0\t1\n"))


def test_label_outside_0_1_2(tmp_path):
  with pytest.raises(ValueError, match=r"toy\.inter, line 3, column 'x_label': value 3"):
    data.load_mmrec(_write(tmp_path, "0\t0\t0\n0\t1\t3\n"))


def test_duplicate_pair_names_first_repeated_line(tmp_path):
  # (1, 1) repeats on line 6 and (0, 0) on line 7: the first line that repeats an earlier one is line 6.
  rows = "0\t0\t0\n1\t1\t0\n0\t2\t1\n1\t0\t2\n1\t1\t1\n0\t0\t2\n"
  with pytest.raises(ValueError, match=r"line 6: duplicate interaction \(userID 1, itemID 1\) already on line 3"):
    data.load_mmrec(_write(tmp_path, rows))


def test_feature_rows_differ_from_n_items(tmp_path):
  directory = _write(tmp_path, GOOD)
  np.save(directory / "image_feat.npy", np.zeros((5, 2), dtype=np.float32))
  with pytest.raises(ValueError, match=r"image_feat\.npy: 5 feature rows but .* n_items=4"):
    data.load_mmrec(directory)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features(tmp_path, bad):
  directory = _write(tmp_path, GOOD)
  table = np.zeros((4, 3), dtype=np.float32)
  table[2, 1] = bad
  table[3, 0] = bad
  np.save(directory / "text_feat.npy", table)
  with pytest.raises(ValueError, match=r"text_feat\.npy: row 2 .*NaN or inf"):
    data.load_mmrec(directory)


def test_valid_test_users_without_training_are_dropped(tmp_path):
  rows = GOOD + "2\t1\t1\n2\t2\t2\n3\t3\t2\n"  # users 2 and 3 have no training row
  with pytest.warns(UserWarning, match=r"dropped 2 user\(s\) .* \(1 valid and 2 test rows\)"):
    ds = data.load_mmrec(_write(tmp_path, rows))
  assert ds.n_users == 4 and len(ds.valid) == 2 and len(ds.test) == 2
  assert set(ds.test.user.tolist()) == {0, 1}


@pytest.mark.parametrize(
  "split, rows",
  [
    ("test", "0\t0\t0\n0\t1\t1\n"),
    ("valid", "0\t0\t0\n0\t1\t2\n"),
    ("train", "0\t0\t1\n0\t1\t2\n"),
  ],
)
def test_empty_split(tmp_path, split, rows):
  with pytest.raises(ValueError, match=f"the '{split}' split is empty"), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    data.load_mmrec(_write(tmp_path, rows))


def test_header_only(tmp_path):
  with pytest.raises(ValueError, match="no interactions"):
    data.load_mmrec(_write(tmp_path, ""))


def test_dataset_constructor_checks():
  s = data.Split([0], [0])
  with pytest.raises(ValueError, match="item id 3 >= n_items=2"):
    data.Dataset("x", 1, 2, data.Split([0], [3]), s, s)
  with pytest.raises(ValueError, match="features"):
    data.Dataset("x", 1, 2, s, s, s, features={"image": np.zeros((3, 2))})
  with pytest.raises(ValueError, match="differ in length"):
    data.Split([0, 1], [0])
  ds = data.Dataset("x", 1, 2, data.Split([0, 0], [1, 1]), s, s)
  with pytest.raises(ValueError, match="more than once"):
    ds.items_by_user("train")


# ---------------------------------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------------------------------


def _assert_same(a: data.Dataset, b: data.Dataset):
  assert (a.name, a.n_users, a.n_items) == (b.name, b.n_users, b.n_items)
  for split in data.SPLITS:
    np.testing.assert_array_equal(a.split(split).user, b.split(split).user)
    np.testing.assert_array_equal(a.split(split).item, b.split(split).item)
  assert a.features.keys() == b.features.keys()
  for m in a.features:
    np.testing.assert_array_equal(a.features[m], b.features[m])


def test_synthetic_is_deterministic():
  _assert_same(data.synthetic_preset("tiny", seed=5), data.synthetic_preset("tiny", seed=5))
  a, b = data.synthetic_preset("tiny", seed=5), data.synthetic_preset("tiny", seed=6)
  assert not np.array_equal(a.train.item, b.train.item)
  # a modality's width does not change the interactions or the other modality
  c = data.synthetic_preset("tiny", seed=5, image_dim=0)
  np.testing.assert_array_equal(a.train.item, c.train.item)
  np.testing.assert_array_equal(a.features["text"], c.features["text"])
  assert "image" not in c.features


def test_synthetic_structure():
  ds = data.synthetic_preset("tiny")
  assert (ds.n_users, ds.n_items) == (60, 40)
  assert len(ds.train) + len(ds.valid) + len(ds.test) == 600
  assert {m: f.shape for m, f in ds.features.items()} == {"image": (40, 16), "text": (40, 8)}
  keys = np.concatenate([s.user.astype(np.int64) * ds.n_items + s.item for s in (ds.train, ds.valid, ds.test)])
  assert np.unique(keys).size == keys.size  # no pair twice, across splits either
  n = np.bincount(np.concatenate([ds.train.user, ds.valid.user, ds.test.user]), minlength=ds.n_users)
  n_valid = np.bincount(ds.valid.user, minlength=ds.n_users)
  n_test = np.bincount(ds.test.user, minlength=ds.n_users)
  assert n.min() >= 5 and np.bincount(ds.train.user).min() >= 3
  # MMRec rule: n < 10 -> 1 valid + 1 test; else n // 10 valid and round-half-up(n / 10) test
  np.testing.assert_array_equal(n_valid, np.where(n < 10, 1, n // 10))
  np.testing.assert_array_equal(n_test, np.where(n < 10, 1, (n + 5) // 10))


def test_synthetic_has_learnable_signal():
  # On the default preset, popularity and a feature-based user profile (mean of the user's training item
  # features, cosine scores) both beat random scores clearly; this is the signal the models must find.
  ds = data.synthetic_preset("default")
  assert (ds.n_users, ds.n_items, len(ds.train) + len(ds.valid) + len(ds.test)) == (1000, 500, 15_000)
  assert {m: f.shape[1] for m, f in ds.features.items()} == {"image": 64, "text": 32}

  def recall(table):
    table = jnp.asarray(table, jnp.float32)
    return metrics.evaluate(lambda u: table[u], ds, "valid", ks=(20,))["recall@20"]

  rng = np.random.default_rng(0)
  random = recall(rng.standard_normal((ds.n_users, ds.n_items)))
  popularity = recall(np.tile(np.bincount(ds.train.item, minlength=ds.n_items), (ds.n_users, 1)))
  features = ds.features["text"] / np.linalg.norm(ds.features["text"], axis=1, keepdims=True)
  profile = np.zeros((ds.n_users, features.shape[1]), np.float32)
  np.add.at(profile, ds.train.user, features[ds.train.item])
  content = recall(profile @ features.T)
  assert random < 0.06 and popularity > 2 * random and content > 2 * random


def test_presets_shapes():
  assert {k: data.PRESETS[k]["n_users"] for k in ("baby", "electronics")} == {"baby": 19_445, "electronics": 192_403}
  for name, shape in {"baby": (19_445, 7_050, 160_792), "electronics": (192_403, 63_001, 1_689_188)}.items():
    p = data.PRESETS[name]
    assert (p["n_users"], p["n_items"], p["n_interactions"], p["image_dim"], p["text_dim"]) == (*shape, 4096, 384)
  # a scaled-down Electronics: 1% of users, items and interactions, same feature widths
  ds = data.synthetic_preset("electronics", scale=0.01, text_dim=16)
  assert (ds.n_users, ds.n_items) == (1924, 630)
  assert len(ds.train) + len(ds.valid) + len(ds.test) == 16_892
  assert {m: f.shape for m, f in ds.features.items()} == {"image": (630, 4096), "text": (630, 16)}
  with pytest.raises(ValueError, match="unknown synthetic preset"):
    data.synthetic_preset("huge")


def test_synthetic_argument_checks():
  with pytest.raises(ValueError, match="n_interactions"):
    data.synthetic(n_users=10, n_items=20, n_interactions=10)
  with pytest.raises(ValueError, match="min_user_interactions"):
    data.synthetic(n_users=10, n_items=20, n_interactions=100, min_user_interactions=2)


def test_write_load_round_trip(tmp_path):
  ds = data.synthetic_preset("tiny", seed=2)
  data.write_mmrec(ds, tmp_path / "out")
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
    "image_feat.npy",
    "synthetic-tiny.inter",
    "text_feat.npy",
  ]
  _assert_same(data.load_mmrec(tmp_path / "out"), ds)
  data.write_mmrec(ds, tmp_path / "out")  # rewriting the same data set is fine
  _write(tmp_path / "other", GOOD)
  with pytest.raises(FileExistsError, match="toy.inter"):
    data.write_mmrec(ds, tmp_path / "other")


def test_load_spec(tmp_path):
  _assert_same(data.load("synthetic:tiny"), data.synthetic_preset("tiny"))
  _assert_same(data.load("synthetic:tiny", seed=1), data.synthetic_preset("tiny", seed=1))
  assert data.load(str(_write(tmp_path, GOOD))).name == "toy"
  with pytest.raises(ValueError, match="unknown synthetic preset"):
    data.load("synthetic:nope")
  with pytest.raises(FileNotFoundError):
    data.load(str(tmp_path / "missing"))
