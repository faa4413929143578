"""MG under JAX's own sharding, on 4 host CPU devices.

The device count is fixed when JAX starts, so the check runs in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``; nothing leaks into this pytest process.
"""

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
  """
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mirror_optax import mirror_gradient

    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    n_rows, dim, batch_size, steps = 32, 8, 64, 7
    params0 = {"table": (rng.normal(size=(n_rows, dim)) * 0.1).astype(np.float32),  # numpy: each
               "w": rng.normal(size=(dim,)).astype(np.float32)}  # device_put makes fresh buffers
    batches = [jnp.asarray(rng.integers(0, n_rows, size=(batch_size, 3)), jnp.int32) for _ in range(steps)]

    def loss(params, batch):  # BPR on embedding rows, mean over the batch
        t = params["table"]
        u, i, j = t[batch[:, 0]] * params["w"], t[batch[:, 1]], t[batch[:, 2]]
        diff = jnp.sum(u * i, -1) - jnp.sum(u * j, -1)
        return -jnp.mean(jax.nn.log_sigmoid(diff))

    def make_step(tx, pmean_axis=None):
        def step(params, state, batch):
            g = jax.grad(loss)(params, batch)
            if pmean_axis:
                g = jax.lax.pmean(g, pmean_axis)
            grad_fn = lambda p, _: jax.grad(loss)(p, batch)
            updates, state = tx.update(g, state, params, grad_fn=grad_fn)
            return optax.apply_updates(params, updates), state
        return step

    def run(step, params, batch_sharding=None):
        state = jax.jit(tx.init)(params)
        for b in batches:
            if batch_sharding is not None:
                b = jax.device_put(b, batch_sharding)
            params, state = step(params, state, b)
        return jax.tree.map(np.asarray, params), params

    def maxdiff(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    tx = mirror_gradient(optax.adam(0.05), alpha1=1.0, alpha2=0.2, beta=2)
    step = jax.jit(make_step(tx), donate_argnums=(0, 1))
    ref, _ = run(step, jax.device_put(params0))

    replicated = NamedSharding(mesh, P())
    data_sharded = NamedSharding(mesh, P("data"))
    batch_params = jax.device_put(params0, replicated)
    batch_out, _ = run(step, batch_params, batch_sharding=data_sharded)

    row_params = {"table": jax.device_put(params0["table"], NamedSharding(mesh, P("data", None))),
                  "w": jax.device_put(params0["w"], replicated)}
    row_out, row_live = run(step, row_params, batch_sharding=data_sharded)
    row_spec = str(row_live["table"].sharding.spec)

    tx_sm = mirror_gradient(optax.adam(0.05), alpha1=1.0, alpha2=0.2, beta=2, batch_axis_name="data")
    local = make_step(tx_sm, pmean_axis="data")
    # check_vma=False: per-device gradients are local (classic pmap semantics), so the caller
    # pmeans the first gradient and MG (batch_axis_name) the second.
    sm_step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data")),
                                    out_specs=(P(), P()), check_vma=False))
    params = jax.device_put(params0, replicated)
    state = tx_sm.init(params)
    for b in batches:
        params, state = sm_step(params, state, b)
    sm_out = jax.tree.map(np.asarray, params)

    print(json.dumps({"batch_sharded": maxdiff(ref, batch_out), "row_sharded": maxdiff(ref, row_out),
                      "row_spec": row_spec, "shard_map_pmean": maxdiff(ref, sm_out),
                      "moved": maxdiff(ref, params0)}))
    """
)


def test_sharded_mg_step_matches_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-4000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["moved"] > 1e-2  # the run really trained
  assert result["batch_sharded"] <= 1e-6, result
  assert result["row_sharded"] <= 1e-6, result
  assert "data" in result["row_spec"], result  # the table stayed row-sharded through the steps
  assert result["shard_map_pmean"] <= 1e-6, result
