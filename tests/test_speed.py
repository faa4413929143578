"""benchmarks.speed runs and reports; the speed fixes it motivated keep the math; every perf command's command
line (``--help``, one-line usage errors). No timing assertions."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import data_speed as data_speed_command
from benchmarks import device_check as device_check_command
from benchmarks import propagation_speed as propagation_command
from benchmarks import scale as scale_command
from benchmarks import speed as speed_command
from benchmarks.data import dataset as data_lib
from benchmarks.data.sampling import NegativeSampler
from benchmarks.perf import data_speed, device_check, propagation, scale, speed
from benchmarks.training.loop import interactions
from models import common, graph
from models.vbpr import VBPR


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
  path = tmp_path_factory.mktemp("speed") / "speed.json"
  result = speed_command.main(
    [
      "--quick",
      "--models",
      "lightgcn1",
      "--methods",
      "plain,mg,sam",
      "--betas",
      "3",
      "--repeats",
      "2",
      "--epoch-repeats",
      "1",
      "--json",
      str(path),
    ]
  )
  return result, json.loads(path.read_text())


def test_quick_mode_writes_the_documented_keys(quick_result):
  result, written = quick_result
  assert written["mode"] == "quick"
  rec = written["models"]["lightgcn1"]
  for key in (
    "plain_step_s",
    "mg_beta3_ratio",
    "mg_beta3_ideal",
    "sam_ratio",
    "train_s_per_epoch",
    "eval_s",
    "eval_users_per_s",
    "sampling_s",
  ):
    assert isinstance(rec[key], float) and math.isfinite(rec[key]) and rec[key] > 0, key
  assert rec["mg_beta3_ideal"] == pytest.approx(4 / 3)
  assert rec["variants"]["sam"]["ideal"] == 2.0
  assert set(rec["variants"]) == {"plain", "mg_beta3", "sam"}
  assert set(rec["epoch_split"]) == {"sampling_s", "batching_s", "train_steps_s", "eval_s"}
  assert written["peer"]["train_s_per_epoch"]["lightgcn1"] == [3.6, 3.8]
  assert written["machine"]["cpu_count"] >= 1
  assert result["models"]["lightgcn1"]["plain_step_s"] == rec["plain_step_s"]


def test_ratios_are_paired_per_round(quick_result):
  """Each variant's ratio is the median of its per-round ratios to plain's call in the same round."""
  _, written = quick_result
  variants = written["models"]["lightgcn1"]["variants"]
  plain = variants["plain"]["step_s_all"]
  for key, v in variants.items():
    assert len(v["step_s_all"]) == len(v["ratio_all"]) == 2, key
    np.testing.assert_allclose(v["ratio_all"], np.asarray(v["step_s_all"]) / np.asarray(plain), rtol=1e-12)
    assert v["ratio"] == pytest.approx(float(np.median(v["ratio_all"])))
    assert v["ratio_over_ideal"] == pytest.approx(v["ratio"] / v["ideal"])
  assert variants["plain"]["ratio_all"] == [1.0, 1.0]


def test_tables_print(quick_result):
  result, _ = quick_result
  records = result["models"]
  assert "MG β=3" in speed.format_ratio_table(records)
  peer = speed.format_peer_table(records)
  assert "3.60–3.80" in peer and "evaluation pass" in peer
  assert "train steps" in speed.format_split_table(records)


def test_electronics_mode_quick(capsys):
  result = speed_command.main(["--electronics", "--quick"])
  assert result["mode"] == "electronics-quick"
  assert result["peak_rss"]["ru_maxrss_mib"] > 0
  assert result["second_epoch"]["train_s"] > 0 and result["eval_s"] > 0
  assert "peak RSS" in capsys.readouterr().out


def test_cli_rejects_unknown_names():
  with pytest.raises(SystemExit):
    speed_command.main(["--quick", "--models", "bpr"])
  with pytest.raises(ValueError, match="unknown method"):
    speed.make_variants(["adam"])


# --------------------------------------------------------------------------------------------------
# The perf commands' command lines
# --------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("speed", "data_speed", "propagation_speed", "scale", "device_check")


def _command(*argv: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help_and_a_bad_flag(name):
  """``--help`` exits 0; an unknown flag exits 2 with one line on stderr naming it, and nothing on stdout."""
  helped = _command(f"benchmarks.{name}", "--help")
  assert helped.returncode == 0, helped.stderr[-2000:]
  assert helped.stdout.startswith(f"usage: python -m benchmarks.{name}") and "--help" in helped.stdout
  bad = _command(f"benchmarks.{name}", "--no-such-flag")
  assert bad.returncode == 2, bad.stderr[-2000:]
  assert bad.stdout == ""
  assert bad.stderr.splitlines() == [f"python -m benchmarks.{name}: error: unrecognized arguments: --no-such-flag"], (
    bad.stderr
  )


@pytest.mark.parametrize(
  "main, argv, flag",
  [
    (speed_command.main, ["--repeats", "0"], "--repeats"),
    (speed_command.main, ["--betas", "3,x"], "--betas"),
    (speed_command.main, ["--methods", "plain,adam"], "--methods"),
    (speed_command.main, ["--electronics", "--models", "vbpr"], "--models"),
    (speed_command.main, ["--electronics-layers", "2"], "--electronics-layers"),
    (data_speed_command.main, ["--electronics-users", "-1"], "--electronics-users"),
    (propagation_command.main, ["--users", "10", "--items", "3", "--pairs", "40"], "--pairs"),
    (propagation_command.main, ["--data", "synthetic:nope"], "--data"),
    (propagation_command.main, ["--data", "synthetic:tiny", "--users", "5"], "--users"),
    (scale_command.main, ["--users", "1e6"], "--items"),
    (scale_command.main, ["--users", "nan", "--items", "5", "--interactions", "9"], "--users"),
    (scale_command.main, ["--preset", "tiny", "--devices", "4", "--processes", "3"], "--processes"),
    (scale_command.main, ["--preset", "tiny", "--fully-sharded"], "--fully-sharded"),
    (scale_command.main, ["--preset", "tiny", "--largest"], "--memory-gib"),
    (scale_command.main, ["--users", "9", "--items", "5", "--interactions", "30", "--measure"], "--preset"),
    (device_check_command.main, ["--skip", "ratios,gpu"], "--skip"),
    (device_check_command.main, ["--budget-s", "0"], "--budget-s"),
  ],
)
def test_bad_values_are_one_line_usage_errors(main, argv, flag, capsys):
  """Bad values and combinations are refused before any work: status 2, one line naming the flag."""
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert e.value.code == 2
  out, err = capsys.readouterr()
  assert out == "" and len(err.splitlines()) == 1 and flag in err, err


def test_json_must_be_writable_before_any_work(tmp_path, capsys):
  for main in (speed_command.main, scale_command.main, device_check_command.main):
    with pytest.raises(SystemExit) as e:
      main(["--json", str(tmp_path)])  # a directory
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--json" in err, err


def test_parsed_options():
  o = speed.parse_args(["--models", "lightgcn,vbpr,lightgcn1", "--methods", "mg", "--betas", "3,3,5", "--quick"])
  assert o.cases == ("lightgcn1", "lightgcn3", "vbpr") and o.methods == ("mg",) and o.betas == (3, 5)
  assert (o.repeats, o.epoch_repeats, o.electronics) == (2, 2, False)
  assert speed.parse_args(["--repeats", "9", "--epoch-repeats", "12"]).epoch_repeats == 9
  assert speed.parse_args(["--electronics"]) == speed.Options(electronics=True, electronics_layers=1)
  assert data_speed.parse_args([]) == data_speed.Options()
  assert propagation.parse_args([]) == propagation.Options()
  assert propagation.parse_args(["--data", "synthetic:tiny"]).data == "synthetic:tiny"
  o = scale.parse_args(["--measure-child", "tiny", "--model", "vbpr", "--batch-size", "64"])
  assert o.child and o.preset == "tiny" and o.shape.model == "vbpr" and o.shape.batch_size == 64
  assert o.shape.layers is None  # the model's default, as measure() passes it
  d = device_check.parse_args(["--quick", "--skip", "tests,ratios"])
  assert d == device_check.Options(quick=True, budget_s=300.0, skip=("tests", "ratios"))


# --------------------------------------------------------------------------------------------------
# The speed fixes compute the same thing
# --------------------------------------------------------------------------------------------------


def test_chunked_propagation_matches_segment_sum_in_every_mode():
  rng = np.random.default_rng(0)
  nu, ni = 30, 20
  rows, cols, vals = (
    jnp.asarray(a) for a in graph.normalized_adjacency(rng.integers(0, nu, 150), rng.integers(0, ni, 150), nu, ni)
  )
  x = jnp.asarray(rng.normal(size=(nu + ni, 5)).astype(np.float32))
  t = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
  ref = lambda z: graph.propagate_segment_sum(z, rows, cols, vals)
  for chunk in (7, 64, 10_000):  # several chunks with a padded last one; one chunk; no scan
    chunked = lambda z: graph.propagate_chunked(z, rows, cols, vals, chunk_size=chunk)
    np.testing.assert_allclose(chunked(x), ref(x), rtol=1e-5, atol=1e-6)
    obj = lambda f: lambda z: jnp.sum(jnp.sin(graph.layer_mean(z, 2, f)))
    np.testing.assert_allclose(jax.grad(obj(chunked))(x), jax.grad(obj(ref))(x), rtol=1e-5, atol=1e-6)
    hvp = lambda f: jax.jvp(jax.grad(obj(f)), (x,), (t,))[1]  # forward-over-reverse
    np.testing.assert_allclose(hvp(chunked), hvp(ref), rtol=1e-4, atol=1e-5)


def test_rows_matmul_matches_matmul_with_gradients():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(9, 6)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(6, 4)).astype(np.float32))
  np.testing.assert_allclose(common.rows_matmul(x, w), x @ w, rtol=1e-6)
  f = lambda fn: lambda w: jnp.sum(jnp.tanh(fn(x, w)))
  np.testing.assert_allclose(jax.grad(f(common.rows_matmul))(w), jax.grad(f(jnp.matmul))(w), rtol=1e-5)
  hvp = lambda fn: jax.jvp(jax.grad(f(fn)), (w,), (w,))[1]
  np.testing.assert_allclose(hvp(common.rows_matmul), hvp(jnp.matmul), rtol=1e-4, atol=1e-6)


def test_vbpr_batch_row_loss_matches_full_table_loss():
  ds = data_lib.synthetic_preset("tiny", seed=0)
  m = VBPR(interactions(ds), rngs=nnx.Rngs(0), reg_weight=0.5)
  batch = {k: jnp.asarray(v[:16]) for k, v in NegativeSampler(ds).epoch(np.random.default_rng(0)).items()}

  def full_table(model):  # MMRec's formulation: every item's vector, then the batch rows
    raw = jnp.concatenate([model.text_features[...], model.image_features[...]], axis=-1)
    items = jnp.concatenate([model.item_embedding.embedding[...], model.item_linear(raw)], axis=-1)
    u = model.user_embedding.embedding[...][batch["user"]]
    p, n = items[batch["pos"]], items[batch["neg"]]
    return common.bpr_loss(jnp.sum(u * p, -1), jnp.sum(u * n, -1)) + model.reg_weight * common.emb_loss(u, p, n)

  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  fast = lambda p: nnx.merge(graphdef, p, rest).loss(batch)
  slow = lambda p: full_table(nnx.merge(graphdef, p, rest))
  np.testing.assert_allclose(fast(params), slow(params), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(jax.grad(fast)(params)), jax.tree.leaves(jax.grad(slow)(params))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
