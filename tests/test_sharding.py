"""Training over 4 host CPU devices (benchmarks.parallel.mesh) matches one device.

The device count is fixed when JAX starts, so the multi-device runs happen in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``; this pytest process keeps one device.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from benchmarks.parallel import mesh as sharding
from benchmarks.training.loop import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
  """
    import json, warnings
    import jax, numpy as np
    from benchmarks.data import dataset as data
    from benchmarks.training.loop import TrainConfig, fit

    assert jax.device_count() == 4, jax.devices()
    ds = data.synthetic_preset("tiny", seed=0)  # 60 users, 40 items: both divide by 4
    base = dict(model="lightgcn", method="mg", batch_size=32, max_epochs=2, patience=10, seed=1,
                model_hparams={"n_layers": 2}, method_hparams={"beta": 3})

    def run(**kw):
        fitted = fit(ds, TrainConfig(**base, **kw), progress=False)
        params = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
                  for path, leaf in jax.tree_util.tree_flatten_with_path(fitted.params)[0]}
        return fitted.record, params

    def diff(a, b):
        rec_a, par_a = a
        rec_b, par_b = b
        metrics = max(abs(rec_a[s][m] - rec_b[s][m]) for s in ("valid", "test") for m in rec_a[s])
        losses = max(abs(x["loss"] - y["loss"]) for x, y in zip(rec_a["history"], rec_b["history"]))
        params = max(float(np.max(np.abs(np.asarray(par_a[k]) - np.asarray(par_b[k])))) for k in par_a)
        return {"metrics": metrics, "losses": losses, "params": params}

    # placement of the optimizer moments: they follow their table
    from benchmarks.parallel import mesh as sharding
    from benchmarks.training.loop import build
    built = build(ds, TrainConfig(**base))
    mesh = sharding.make_mesh(4)
    _, placed_state, _ = sharding.place_state(mesh, built.graphdef, built.params,
                                              built.method.tx.init(built.params), built.rest, shard_tables=True)
    moment_specs = sorted({str(leaf.sharding.spec) for path, leaf in jax.tree_util.tree_flatten_with_path(placed_state)[0]
                           if np.ndim(leaf) == 2})

    odd = data.synthetic_preset("tiny", seed=0, n_users=62)  # 62 rows: not divisible by 4
    odd_built = build(odd, TrainConfig(**base))
    with warnings.catch_warnings(record=True) as odd_caught:
        warnings.simplefilter("always")
        odd_params, _, _ = sharding.place_state(mesh, odd_built.graphdef, odd_built.params,
                                                odd_built.method.tx.init(odd_built.params), odd_built.rest,
                                                shard_tables=True)
    odd_specs = {"/".join(str(getattr(k, "key", k)) for k in path): str(leaf.sharding.spec)
                 for path, leaf in jax.tree_util.tree_flatten_with_path(odd_params)[0]}

    one = run()
    data_parallel = run(devices=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tables = run(devices=4, shard_tables=True)
    print(json.dumps({
        "data_parallel": diff(one, data_parallel),
        "row_sharded": diff(one, tables),
        "updates": one[0]["updates"],
        "recall20": one[0]["test"]["recall@20"],
        "specs": {k: str(v.sharding.spec) for k, v in tables[1].items()},
        "replicated_specs": {k: str(v.sharding.spec) for k, v in data_parallel[1].items()},
        "n_devices": {k: len(v.sharding.device_set) for k, v in tables[1].items()},
        "warnings": [str(w.message) for w in caught if "shard_tables" in str(w.message)],
        "moment_specs": moment_specs,
        "odd_specs": odd_specs,
        "odd_warnings": [str(w.message) for w in odd_caught],
    }))
    """
)


@pytest.fixture(scope="module")
def four_device_run():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_data_parallel_training_matches_one_device(four_device_run):
  r = four_device_run
  assert r["updates"] == 2 * 15  # 465 pairs / 32: 14 full batches + a remainder (17, replicated)
  assert r["recall20"] > 0
  for key in ("metrics", "losses", "params"):
    assert r["data_parallel"][key] <= 1e-5, r["data_parallel"]
  assert all(spec == "P()" for spec in r["replicated_specs"].values()), r["replicated_specs"]


def test_row_sharded_tables_match_one_device(four_device_run):
  r = four_device_run
  for key in ("metrics", "losses", "params"):
    assert r["row_sharded"][key] <= 1e-5, r["row_sharded"]
  tables = {k: v for k, v in r["specs"].items() if k.endswith("embedding")}
  assert set(tables) == {"user_embedding/embedding", "item_embedding/embedding"}
  assert all(spec == "P('data', None)" for spec in tables.values()), r["specs"]
  assert all(n == 4 for n in r["n_devices"].values())
  assert not r["warnings"]
  assert r["moment_specs"] == ["P('data', None)"]  # Adam's mu/nu of both tables, row-sharded too


def test_indivisible_table_falls_back_to_column_sharding(four_device_run):
  r = four_device_run
  assert r["odd_specs"]["user_embedding/embedding"] == "P(None, 'data')"  # 62 rows, 64 columns
  assert r["odd_specs"]["item_embedding/embedding"] == "P('data', None)"
  assert any("user_embedding/embedding has 62 rows" in w for w in r["odd_warnings"]), r["odd_warnings"]


def test_placement_helpers_on_one_device():
  mesh = sharding.make_mesh(1)
  assert mesh.shape == {"data": 1}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
  s = sharding.batch_sharding(mesh, (3, 8))
  assert s.spec == jax.sharding.PartitionSpec(None, "data")
  placed = sharding.place_batches(mesh, {"user": np.arange(6, dtype=np.int32).reshape(2, 3)})
  np.testing.assert_array_equal(np.asarray(placed["user"]), np.arange(6).reshape(2, 3))


def test_errors():
  with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
    sharding.make_mesh(jax.device_count() + 1)
  with pytest.raises(ValueError, match="shard_tables needs TrainConfig.devices"):
    TrainConfig(shard_tables=True)
  with pytest.raises(ValueError, match="devices must be None or >= 1"):
    TrainConfig(devices=0)
