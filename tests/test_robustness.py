"""Robustness / landscape commands and the perturbation helpers: exactness, targeting, JSON schema, reruns."""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from benchmarks import landscape as landscape_command
from benchmarks import robustness as robustness_command
from benchmarks.data import dataset as data_lib
from benchmarks.data.fingerprint import dataset_fingerprint
from benchmarks.experiments import landscape
from benchmarks.experiments import perturb
from benchmarks.experiments import robustness
from benchmarks.training import loop, records
from benchmarks.training.loop import TrainConfig, build
from mirror_optax import random_directions

TABLES = {  # documented in benchmarks/experiments/perturb.py
  "vbpr": [("item_embedding", "embedding"), ("user_embedding", "embedding")],
  "lightgcn": [("item_embedding", "embedding"), ("user_embedding", "embedding")],
  "bm3": [("image_features",), ("item_id_embedding", "embedding"), ("text_features",), ("user_embedding", "embedding")],
}


@pytest.fixture(scope="module")
def tiny():
  return data_lib.synthetic_preset("tiny")


@pytest.fixture(scope="module")
def wide():
  """300 items, so that 1 % of them is round(3.0) = 3 items."""
  return data_lib.synthetic(n_users=40, n_items=300, n_interactions=400, latent_dim=4, image_dim=8, text_dim=4, seed=0)


def _built(ds, model):
  b = build(ds, TrainConfig(model=model, seed=0))
  return b.graphdef, b.params, b.rest


def _leaves(state):
  return {perturb.key_path(kp): np.asarray(x) for kp, x in jax.tree_util.tree_leaves_with_path(state)}


# --------------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["vbpr", "lightgcn", "bm3"])
def test_noise_touches_only_the_documented_tables(tiny, model):
  g, params, rest = _built(tiny, model)
  paths = perturb.noise_table_paths(nnx.merge(g, params, rest))
  assert paths == TABLES[model]
  noisy = perturb.add_gaussian_noise(params, paths, 0.1, jax.random.key(3))
  before, after = _leaves(params), _leaves(noisy)
  assert before.keys() == after.keys()
  changed = sorted(p for p in before if not np.array_equal(before[p], after[p]))
  assert changed == TABLES[model]
  for p in changed:  # N(0, sigma^2) with sigma = 0.1
    diff = after[p] - before[p]
    assert abs(diff.std() - 0.1) < 0.01 and abs(diff.mean()) < 0.01
  # the draw is a function of the key only
  again = perturb.add_gaussian_noise(params, paths, 0.1, jax.random.key(3))
  assert all(np.array_equal(after[p], x) for p, x in _leaves(again).items())


@pytest.mark.parametrize("model", ["vbpr", "lightgcn", "bm3"])
def test_noise_with_sigma_zero_leaves_metrics_unchanged_exactly(tiny, model):
  g, params, rest = _built(tiny, model)
  clean = robustness.heldout_metrics(g, params, rest, tiny)
  out = robustness.noise_experiment(g, params, rest, tiny, sigmas=[0.0, 0.5], repeats=2, seed=0, clean=clean)
  assert out["tables"] == [perturb.path_name(p) for p in TABLES[model]]
  zero, big = out["results"]
  for m in robustness.METRICS:
    assert zero[m]["values"] == [clean[m], clean[m]]
    assert zero[m]["drop"] == 0.0 and zero[m]["std"] == 0.0
  assert zero["variance"] == 0.0 and big["variance"] == 0.25
  if model != "bm3":  # for BM3 only the ID tables matter at inference; large noise still moves them
    assert any(big[m]["values"] != [clean[m]] * 2 for m in robustness.METRICS)


def test_add_gaussian_noise_rejects_a_negative_sigma(tiny):
  _, params, _ = _built(tiny, "lightgcn")
  with pytest.raises(ValueError, match="sigma"):
    perturb.add_gaussian_noise(params, TABLES["lightgcn"], -1.0, jax.random.key(0))


# --------------------------------------------------------------------------------------------------
# Information adjustment
# --------------------------------------------------------------------------------------------------


def test_select_items_and_donors():
  for n, p in [(300, 0.01), (1585, 0.01), (1585, 0.05), (1585, 0.1), (40, 0.0), (40, 1.0)]:
    rng = np.random.default_rng(0)
    items = perturb.select_items(n, p, rng)
    assert items.size == round(p * n) and np.unique(items).size == items.size
    donors = perturb.pick_donors(items, n, rng)
    assert np.all(donors != items) and np.all((0 <= donors) & (donors < n))
  with pytest.raises(ValueError, match="fraction"):
    perturb.select_items(10, 1.5, np.random.default_rng(0))
  with pytest.raises(ValueError, match="2 items"):
    perturb.pick_donors(np.array([0]), 1, np.random.default_rng(0))


@pytest.mark.parametrize("model,where", [("vbpr", "rest"), ("bm3", "params")])
@pytest.mark.parametrize("kind", ["text_swap", "image_noise"])
def test_one_percent_adjustment_changes_exactly_those_rows(wide, model, where, kind):
  g, params, rest = _built(wide, model)
  tables = perturb.feature_table_paths(nnx.merge(g, params, rest))
  assert set(tables) == {"text", "image"} and all(w == where for w, _ in tables.values())
  rng = np.random.default_rng(0)
  items = perturb.select_items(wide.n_items, 0.01, rng)
  donors = perturb.pick_donors(items, wide.n_items, rng)
  assert items.size == round(0.01 * wide.n_items) == 3
  modality = robustness.ADJUSTMENTS[kind]
  p2, r2 = robustness.adjust_features(params, rest, tables[modality], kind, items, donors, np.random.default_rng(1))
  path = tables[modality][1]
  for old, new in ((params, p2), (rest, r2)):  # every other leaf is bit-identical
    a, b = _leaves(old), _leaves(new)
    for p in a:
      if p != path:
        assert np.array_equal(a[p], b[p]), p
  old_t = np.asarray(perturb.get_leaf(params if where == "params" else rest, path))
  new_t = np.asarray(perturb.get_leaf(p2 if where == "params" else r2, path))
  changed = np.flatnonzero(np.any(old_t != new_t, axis=1))
  np.testing.assert_array_equal(changed, items)
  np.testing.assert_array_equal(np.delete(new_t, items, 0), np.delete(old_t, items, 0))  # bit-identical
  if kind == "text_swap":
    np.testing.assert_array_equal(new_t[items], old_t[donors])


@pytest.mark.parametrize("model", ["vbpr", "bm3"])
def test_adjustment_with_p_zero_leaves_metrics_unchanged(tiny, model):
  g, params, rest = _built(tiny, model)
  clean = robustness.heldout_metrics(g, params, rest, tiny)
  out = robustness.adjustment_experiment(g, params, rest, tiny, fractions=[0.0], repeats=2, seed=0, clean=clean)
  assert out["applicable"]
  assert [x["kind"] for x in out["results"]] == ["text_swap", "image_noise"]
  for x in out["results"]:
    assert x["n_items_changed"] == 0
    for m in robustness.METRICS:
      assert x[m]["values"] == [clean[m]] * 2 and x[m]["drop"] == 0.0
  # VBPR scores read its features; BM3 ranks with ID/graph embeddings only
  depends = {t["scores_depend_on_features"] for t in out["tables"].values()}
  assert depends == {model == "vbpr"}


def test_model_without_features_reports_not_applicable(tiny):
  g, params, rest = _built(tiny, "lightgcn")
  out = robustness.adjustment_experiment(
    g, params, rest, tiny, fractions=[0.01], repeats=1, seed=0, clean={m: 0.5 for m in robustness.METRICS}
  )
  assert out == {"applicable": False, "reason": "LightGCN forwards no item features"}


# --------------------------------------------------------------------------------------------------
# Flatness pieces
# --------------------------------------------------------------------------------------------------


def test_fixed_batches_and_loss_are_the_mean_batch_loss(tiny):
  b = robustness.fixed_batches(tiny, batch_size=128, max_pairs=300)
  assert b["user"].shape == (2, 128) and set(b) == {"user", "pos", "neg"}
  again = robustness.fixed_batches(tiny, batch_size=128, max_pairs=300)
  assert all(np.array_equal(b[k], again[k]) for k in b)
  whole = robustness.fixed_batches(tiny, batch_size=4096, max_pairs=8192)
  assert whole["user"].shape == (1, len(tiny.train))
  g, params, rest = _built(tiny, "bm3")
  key = jax.random.key(5)
  model = nnx.merge(g, params, rest)
  manual = np.mean([model.loss({k: v[i] for k, v in b.items()}, jax.random.fold_in(key, i)) for i in range(2)])
  np.testing.assert_allclose(robustness.training_loss_fn(g, rest, b, key)(params), manual, rtol=1e-6)


def test_filter_normalised_directions_match_each_filter_norm(tiny):
  g, params, rest = _built(tiny, "vbpr")
  axes = landscape.filter_axes(nnx.merge(g, params, rest), params)
  assert axes == {
    ("item_embedding", "embedding"): 0,
    ("user_embedding", "embedding"): 0,
    ("item_linear", "kernel"): -1,
    ("item_linear", "bias"): None,
  }
  d1, _ = landscape.normalize_directions(random_directions(params, jax.random.key(0)), params, axes)
  d, p = _leaves(d1), _leaves(params)
  np.testing.assert_allclose(
    np.linalg.norm(d[("user_embedding", "embedding")], axis=1),
    np.linalg.norm(p[("user_embedding", "embedding")], axis=1),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    np.linalg.norm(d[("item_linear", "kernel")], axis=0),
    np.linalg.norm(p[("item_linear", "kernel")], axis=0),
    rtol=1e-5,
  )
  assert not np.any(d[("item_linear", "bias")])


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------

SMALL = [
  "--data",
  "synthetic:tiny",
  "--max-epochs",
  "2",
  "--batch-size",
  "128",
  "--hessian-iters",
  "3",
  "--hessian-pairs",
  "256",
  "--no-progress",
]


def test_robustness_command_schema_and_checkpoint_reuse(tmp_path, capsys):
  ckpt = tmp_path / "ckpt"
  args = [
    *SMALL,
    "--models",
    "vbpr,lightgcn",
    "--methods",
    "plain",
    "--seeds",
    "1",
    "--repeats",
    "2",
    "--sigmas",
    "0,0.05",
    "--fractions",
    "0,0.05",
    "--checkpoint-dir",
    str(ckpt),
    "--out",
    str(tmp_path),
  ]
  result = robustness_command.main(args)
  out = capsys.readouterr().out
  doc = json.loads((tmp_path / "robustness.json").read_text())
  assert doc["schema_version"] == 1 and doc["data"] == "synthetic:tiny"
  assert set(doc) == {"schema_version", "command", "data", "dataset", "settings", "records"}
  assert doc["dataset"]["n_items"] == 40 and doc["settings"]["sigmas"] == [0.0, 0.05]
  assert [(r["model"], r["method"], r["seed"]) for r in doc["records"]] == [
    ("vbpr", "plain", 0),
    ("lightgcn", "plain", 0),
  ]
  assert len(result) == 2
  configs = robustness.parse_options(args).configs
  fingerprint = dataset_fingerprint(data_lib.load("synthetic:tiny"))
  for r, config in zip(doc["records"], configs):
    assert r["status"] == "ok" and not r["from_checkpoint"]
    assert r["key"] == records.run_key(config, fingerprint)
    assert r["checkpoint"] == str(records.checkpoint_dir(ckpt, config, fingerprint))  # the one rule
    assert set(r) >= {"train", "clean", "noise", "adjustment", "flatness", "wall_s"}
    assert set(r["clean"]) == {"recall@5", "recall@20"}
    assert r["clean"]["recall@20"] == pytest.approx(r["train"]["test"]["recall@20"])
    zero, noisy = r["noise"]["results"]
    assert (zero["sigma"], noisy["sigma"]) == (0.0, 0.05) and r["noise"]["repeats"] == 2
    assert (
      set(r["noise"]["table_rms"])
      == set(r["noise"]["tables"])
      == {"user_embedding.embedding", "item_embedding.embedding"}
    )
    assert zero["recall@5"]["drop"] == 0.0 and len(noisy["recall@20"]["values"]) == 2
    assert set(noisy["recall@5"]) == {"mean", "std", "values", "drop"}
    f = r["flatness"]
    assert set(f) >= {"loss", "grad_norm", "top_eigenvalue", "power_iters", "n_batches", "batch_size"}
    assert f["power_iters"] == 3 and f["n_batches"] * f["batch_size"] == f["n_pairs"] == 256
    assert all(math.isfinite(f[k]) for k in ("loss", "grad_norm", "top_eigenvalue"))
  vbpr, lightgcn = doc["records"]
  assert lightgcn["adjustment"]["applicable"] is False
  adj = vbpr["adjustment"]
  assert adj["tables"]["text"] == {"path": "text_features", "state": "rest", "scores_depend_on_features": True}
  assert [(x["kind"], x["fraction"], x["n_items_changed"]) for x in adj["results"]] == [
    ("text_swap", 0.0, 0),
    ("image_noise", 0.0, 0),
    ("text_swap", 0.05, 2),
    ("image_noise", 0.05, 2),
  ]
  # the printed tables
  assert "Noise N(0, σ²)" in out and "Information adjustment" in out and "Flatness" in out
  na_rows = [l for l in out.splitlines() if l.startswith("lightgcn") and "n/a" in l]
  assert len(na_rows) == 2  # the recall@5 and recall@20 adjustment tables
  # a second command loads the finished checkpoint instead of retraining
  again = robustness_command.main(
    [*args[:-2], "--models", "lightgcn", "--methods", "plain", "--out", str(tmp_path / "again")]
  )
  assert again[0]["from_checkpoint"] and again[0]["status"] == "ok"
  for k in ("best_epoch", "epochs", "updates", "test"):
    assert again[0]["train"][k] == lightgcn["train"][k]
  assert again[0]["clean"] == lightgcn["clean"] and again[0]["flatness"]["top_eigenvalue"] == pytest.approx(
    lightgcn["flatness"]["top_eigenvalue"], rel=1e-5
  )


@pytest.mark.parametrize(
  "flag,message",
  [
    (["--sigmas", "-1"], "--sigmas"),
    (["--fractions", "0.5,2"], "--fractions"),
    (["--models", "nope"], "unknown model"),
    (["--repeats", "0"], "--repeats"),
  ],
)
def test_robustness_command_rejects_bad_arguments(flag, message, capsys):
  with pytest.raises(SystemExit) as e:
    robustness_command.main([*SMALL, *flag])
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_landscape_command_writes_png_and_json(tmp_path, capsys):
  doc = landscape_command.main(
    [
      *SMALL,
      "--model",
      "vbpr",
      "--methods",
      "plain,mg",
      "--grid-points",
      "3",
      "--radius",
      "0.5",
      "--out",
      str(tmp_path),
    ]
  )
  out = capsys.readouterr().out
  assert (tmp_path / "landscape.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((tmp_path / "landscape.json").read_text())
  assert saved["xs"] == [-0.5, 0.0, 0.5] and saved["model"] == "vbpr" and list(saved["methods"]) == ["plain", "mg"]
  assert saved["settings"]["filter_axes"]["item_linear.kernel"] == -1
  for m in saved["methods"].values():
    z = np.asarray(m["loss_grid"])
    assert z.shape == (3, 3) and np.all(np.isfinite(z))
    assert z[1, 1] == pytest.approx(m["center_loss"], rel=1e-5)  # the centre is the trained model
    assert math.isfinite(m["top_eigenvalue"]) and m["power_iters"] == 3
  assert doc["methods"].keys() == saved["methods"].keys()
  assert "λ_max" in out and "mg" in out


# --------------------------------------------------------------------------------------------------
# Reruns, errors, interrupts
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def epochs_trained(monkeypatch):
  """Counts the training epochs every ``fit`` of this test runs (a loaded finished run runs none)."""
  count = [0]
  run_epoch = loop.run_epoch

  def counting(*args, **kwargs):
    count[0] += 1
    return run_epoch(*args, **kwargs)

  monkeypatch.setattr(loop, "run_epoch", counting)
  return count


def test_robustness_rerun_loads_the_trained_runs_and_measures_the_same(tmp_path, capsys, epochs_trained):
  out = tmp_path / "out"
  argv = [*SMALL, "--models", "lightgcn", "--methods", "plain,mg", "--seeds", "1", "--repeats", "2"]
  argv += ["--sigmas", "0,0.05", "--fractions", "0", "--out", str(out)]  # no --checkpoint-dir: <out>/checkpoints
  first = robustness_command.main(argv)
  assert epochs_trained[0] == 4  # 2 runs x --max-epochs 2
  assert [Path(r["checkpoint"]) for r in first] == [out / "checkpoints" / r["key"] for r in first]
  assert not any(r["from_checkpoint"] for r in first)
  capsys.readouterr()
  second = robustness_command.main(argv)  # the same command line: its own robustness.json is replaced
  assert epochs_trained[0] == 4  # nothing trained again
  log = capsys.readouterr().out
  assert log.count("loaded (2 epochs)") == 2 and "trained (" not in log
  assert all(r["from_checkpoint"] for r in second)
  for a, b in zip(first, second):
    assert a["key"] == b["key"] and a["train"]["test"] == b["train"]["test"]
    assert a["clean"] == b["clean"] and a["noise"]["results"] == b["noise"]["results"]
    assert a["flatness"]["top_eigenvalue"] == pytest.approx(b["flatness"]["top_eigenvalue"], rel=1e-5)
  assert json.loads((out / "robustness.json").read_text())["records"][0]["from_checkpoint"]


def test_landscape_rerun_loads_the_trained_runs(tmp_path, capsys, epochs_trained):
  argv = [*SMALL, "--model", "lightgcn", "--methods", "plain", "--grid-points", "2", "--out", str(tmp_path)]
  first = landscape_command.main(argv)
  trained = epochs_trained[0]
  assert trained == 2
  second = landscape_command.main(argv)
  assert epochs_trained[0] == trained
  assert "loaded (2 epochs)" in capsys.readouterr().out
  plain = second["methods"]["plain"]
  assert plain["from_checkpoint"] and not first["methods"]["plain"]["from_checkpoint"]
  assert plain["loss_grid"] == first["methods"]["plain"]["loss_grid"]
  assert Path(plain["checkpoint"]) == tmp_path / "checkpoints" / plain["key"]


@pytest.mark.parametrize(
  "main,flag,message",
  [
    (robustness_command.main, ["--repeats", "0"], "argument --repeats: expected an integer >= 1, got 0"),
    (robustness_command.main, ["--nope"], "unrecognized arguments: --nope"),
    (robustness_command.main, ["--optimizer", "adamw2"], "argument --optimizer: unknown optimizer adamw2"),
    (robustness_command.main, ["--data", "synthetic:nope"], "--data synthetic:nope"),
    (robustness_command.main, ["--methods", "plain,mg,plain"], "argument --methods: plain given twice"),
    (landscape_command.main, ["--grid-points", "1"], "argument --grid-points: expected an integer >= 2, got 1"),
    (landscape_command.main, ["--model", "vbpr,bm3"], "argument --model: expected one model"),
    (landscape_command.main, ["--checkpoint-dir", ""], "argument --checkpoint-dir: expected a directory"),
  ],
)
def test_a_bad_flag_exits_2_with_one_line_naming_it(tmp_path, capsys, monkeypatch, main, flag, message):
  monkeypatch.setattr(robustness, "fit", lambda *a, **k: pytest.fail("trained before refusing"))
  with pytest.raises(SystemExit) as e:
    main([*SMALL, "--out", str(tmp_path), *flag])
  err = capsys.readouterr().err
  assert e.value.code == 2
  assert err.count("\n") == 1 and err.startswith(
    ("python -m benchmarks.robustness: error: ", "python -m benchmarks.landscape: error: ")
  )
  assert message in err, err


def test_an_out_of_another_command_line_is_refused(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(robustness, "fit", lambda *a, **k: pytest.fail("trained before refusing"))
  (tmp_path / "robustness.json").write_text(json.dumps({"command": ["python", "-m", "benchmarks.robustness"]}))
  with pytest.raises(SystemExit) as e:
    robustness_command.main([*SMALL, "--models", "lightgcn", "--out", str(tmp_path)])
  assert e.value.code == 2
  assert f"--out {tmp_path} already holds robustness.json of another command line" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(robustness, "fit", interrupted)
  with pytest.raises(SystemExit) as e:
    robustness_command.main([*SMALL, "--models", "lightgcn", "--methods", "plain", "--out", str(tmp_path)])
  err = capsys.readouterr().err
  assert e.value.code == 130 and err.count("\n") == 1 and "interrupted" in err


@pytest.mark.parametrize("main", [robustness_command.main, landscape_command.main])
def test_help(main, capsys):
  with pytest.raises(SystemExit) as e:
    main(["--help"])
  assert e.value.code == 0 and "--checkpoint-dir" in capsys.readouterr().out
