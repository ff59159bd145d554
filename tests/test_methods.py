"""ANIL/BOIL (masked), CAVIA (context), learned inner losses against closed forms, all solvers.

Every inner problem here is a quadratic in the adapted variables, so the adapted value is known
in closed form from the quadratic's Hessian ``A`` and linear term ``c`` (read off the loss by
autodiff of the loss only, exact for a quadratic), never from the solver under test:

- ``unrolled``: ``phi <- (I - a A) phi + a c``, ``K`` times;
- ``implicit``: ``phi = (A + reg I)^-1 (c + reg theta)``;
- ``adjoint``: ``phi(t1)`` of ``dphi/dt = -A phi + c`` by a matrix exponential (augmented with the
  constant term, so a singular ``A``, as CAVIA's rank-one context problem has, is fine).

The reference meta-gradient differentiates these closed forms (``jnp.linalg``, ``expm``) with
respect to everything: the adapted variables' initialization and the values held fixed (the
body, the network, the loss parameters).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.linalg import expm

import metajax

S = metajax.solvers
STEPS, STEP_SIZE, REG, T1 = 4, 0.3, 1.5, 1.2
SOLVERS = {
    "unrolled": lambda loss: S.unrolled(loss, steps=STEPS, step_size=STEP_SIZE),
    "implicit": lambda loss: S.implicit(loss, reg=REG, tol=None,
                                        linear_solver=S.linear_solvers.cg(tol=1e-12)),
    "adjoint": lambda loss: S.adjoint(loss, t1=T1, steps=None),  # vs expm: the adaptive solve
}
RTOL = {"unrolled": 1e-10, "implicit": 1e-7, "adjoint": 1e-7}
RTOL32 = {"unrolled": 1e-4, "implicit": 1e-3, "adjoint": 1e-3}


def closed_form(solver: str, f, theta):
  """The adapted vector for the quadratic ``f`` (on flat vectors) started at ``theta``."""
  z = jnp.zeros_like(theta)
  A, c = jax.hessian(f)(z), -jax.grad(f)(z)
  n = theta.size
  if solver == "unrolled":
    M = jnp.eye(n) - STEP_SIZE * A
    phi = theta
    for _ in range(STEPS):
      phi = M @ phi + STEP_SIZE * c
    return phi
  if solver == "implicit":
    return jnp.linalg.solve(A + REG * jnp.eye(n), c + REG * theta)
  augmented = jnp.zeros((n + 1, n + 1)).at[:n, :n].set(-A).at[:n, n].set(c)
  return (expm(augmented * T1) @ jnp.append(theta, 1.0))[:n]


def rel(a, b):
  a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def tree_rel(a, b):
  return max(rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _data(seed, n, d, dtype, tasks=None):
  rng = np.random.default_rng(seed)
  lead = () if tasks is None else (tasks,)
  x = rng.normal(size=lead + (n, d))
  y = rng.normal(size=lead + (n,))
  return jnp.asarray(x, dtype), jnp.asarray(y, dtype)


# -- ANIL / BOIL: a linear body B and a linear head (w, b) ---------------------------------------
def anil_loss(params, batch):
  x, y = batch
  z = x @ params["body"]
  return 0.5 * jnp.mean((z @ params["head"]["w"] + params["head"]["b"] - y) ** 2)


def anil_params(dtype, d=3, h=2):
  rng = np.random.default_rng(7)
  return {"body": jnp.asarray(rng.normal(size=(d, h)), dtype),
          "head": {"w": jnp.asarray(rng.normal(size=h), dtype), "b": jnp.asarray(0.4, dtype)}}


def anil_reference(solver, params, support, query, part):
  """Query loss after adapting ``part`` ('head' or 'body') in closed form."""
  head_flat = lambda h: jnp.append(h["w"], h["b"])
  if part == "head":
    h = params["head"]["w"].size
    f = lambda v: anil_loss({"body": params["body"], "head": {"w": v[:h], "b": v[h]}}, support)
    v = closed_form(solver, f, head_flat(params["head"]))
    adapted = {"body": params["body"], "head": {"w": v[:h], "b": v[h]}}
  else:
    shape = params["body"].shape
    f = lambda v: anil_loss({"body": v.reshape(shape), "head": params["head"]}, support)
    v = closed_form(solver, f, params["body"].ravel())
    adapted = {"body": v.reshape(shape), "head": params["head"]}
  return anil_loss(adapted, query), adapted


@pytest.mark.parametrize("solver, part", [
    ("unrolled", "head"), ("implicit", "head"), ("adjoint", "head"),
    ("unrolled", "body"), ("implicit", "body")])  # ANIL on all three, BOIL on two (time)
def test_partial_adaptation_matches_closed_form(solver, part):
  params = anil_params(jnp.float64)
  support, query = _data(0, 12, 3, jnp.float64), _data(1, 9, 3, jnp.float64)
  mask = S.path_mask("head") if part == "head" else S.path_mask("head", invert=True)
  adapt = S.masked(SOLVERS[solver](anil_loss), mask)

  phi = adapt(params, support)
  _, phi_ref = anil_reference(solver, params, support, query, part)
  assert tree_rel(phi, phi_ref) <= RTOL[solver]
  frozen = "body" if part == "head" else "head"
  assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(phi[frozen]),
                                                   jax.tree.leaves(params[frozen])))

  grads = jax.grad(lambda p: anil_loss(adapt(p, support), query))(params)
  grads_ref = jax.grad(lambda p: anil_reference(solver, p, support, query, part)[0])(params)
  # The frozen part's meta-gradient is not zero: it flows through the query loss and through
  # the adapted part (as a value the inner loss depends on).
  assert float(jnp.linalg.norm(grads[frozen] if part == "head" else grads[frozen]["w"])) > 1e-3
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    assert rel(a, b) <= RTOL[solver] * 10


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_anil_float32_batched_under_jit_vmap_grad(solver):
  params = anil_params(jnp.float32)
  (xs, ys), (xq, yq) = _data(2, 12, 3, jnp.float32, tasks=3), _data(3, 9, 3, jnp.float32, tasks=3)
  tasks = metajax.tasks.Task((xs, ys), (xq, yq))
  make = SOLVERS[solver] if solver != "implicit" else (  # float32: the fixed-budget default
      lambda loss: S.implicit(loss, reg=REG))
  adapt = S.masked(make(anil_loss), {"body": False, "head": True})
  objective = metajax.meta.meta_objective(adapt, anil_loss)
  grads = jax.jit(jax.grad(objective))(params, tasks)
  assert jax.tree.leaves(grads)[0].dtype == jnp.float32

  p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  def reference(p):
    losses = [anil_reference(solver, p, (jnp.asarray(xs[i], jnp.float64),
                                         jnp.asarray(ys[i], jnp.float64)),
                             (jnp.asarray(xq[i], jnp.float64), jnp.asarray(yq[i], jnp.float64)),
                             "head")[0] for i in range(3)]
    return sum(losses) / 3
  grads_ref = jax.grad(reference)(p64)
  assert tree_rel(grads, grads_ref) <= RTOL32[solver]


def test_masked_meta_sgd_rates_are_masked_like_params():
  params = anil_params(jnp.float64)
  support = _data(0, 12, 3, jnp.float64)
  adapt = S.masked(S.unrolled(anil_loss, steps=2), S.path_mask("head"))
  rates = jax.tree.map(lambda p: jnp.full(p.shape, 0.2), params)
  phi = adapt(params, support, step_size=rates)
  ref = S.masked(S.unrolled(anil_loss, steps=2, step_size=0.2), S.path_mask("head"))(params,
                                                                                       support)
  assert tree_rel(phi, ref) <= 1e-14
  grads = jax.grad(lambda r: jnp.sum(adapt(params, support, step_size=r)["head"]["w"]))(rates)
  assert float(jnp.abs(grads["body"]).max()) == 0.0 and float(jnp.abs(grads["head"]["w"]).max()) > 0


def test_mask_prefix_and_function_forms_agree():
  params = anil_params(jnp.float64)
  support = _data(0, 12, 3, jnp.float64)
  inner = S.unrolled(anil_loss, steps=2, step_size=0.1)
  by_prefix = S.masked(inner, {"body": False, "head": True})(params, support)
  by_tree = S.masked(inner, {"body": False, "head": {"w": True, "b": True}})(params, support)
  by_path = S.masked(inner, S.path_mask(r"head/(w|b)"))(params, support)
  assert tree_rel(by_prefix, by_tree) == 0 and tree_rel(by_prefix, by_path) == 0


# -- CAVIA: a context vector concatenated to the input of a linear model -----------------------
def cavia_apply(net, x):
  return x @ net["w"] + net["b"]


CAVIA_LOSS = metajax.meta.mse_loss(metajax.models.with_context(cavia_apply))


def cavia_reference(solver, net, support, query, context_size):
  f = lambda c: CAVIA_LOSS({"params": net, "context": c}, support)
  c = closed_form(solver, f, jnp.zeros(context_size, net["w"].dtype))
  return CAVIA_LOSS({"params": net, "context": c}, query), c


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_cavia_context_and_meta_gradient_match_closed_form(solver):
  rng = np.random.default_rng(3)
  context_size = 2
  net = {"w": jnp.asarray(rng.normal(size=(3 + context_size, 1))), "b": jnp.asarray([0.2])}
  support = (jnp.asarray(rng.normal(size=(10, 3))), jnp.asarray(rng.normal(size=(10, 1))))
  query = (jnp.asarray(rng.normal(size=(8, 3))), jnp.asarray(rng.normal(size=(8, 1))))
  adapt = S.context(SOLVERS[solver](CAVIA_LOSS), context_size)

  phi = adapt(net, support)
  assert set(phi) == {"params", "context"}
  assert all(a is b for a, b in zip(jax.tree.leaves(phi["params"]), jax.tree.leaves(net)))
  _, c_ref = cavia_reference(solver, net, support, query, context_size)
  assert rel(phi["context"], c_ref) <= RTOL[solver]

  tasks = metajax.tasks.Task(jax.tree.map(lambda a: a[None], support),
                             jax.tree.map(lambda a: a[None], query))
  grads = jax.grad(metajax.meta.meta_objective(adapt, CAVIA_LOSS))(net, tasks)
  grads_ref = jax.grad(lambda n: cavia_reference(solver, n, support, query, context_size)[0])(net)
  assert tree_rel(grads, grads_ref) <= RTOL[solver] * 10


def test_cavia_takes_a_step_size_per_context_entry():
  """Meta-SGD on the context: one step from zero is -step_size * grad, entry by entry, and the
  per-entry rates are learnable (learn=('step_size',))."""
  rng = np.random.default_rng(4)
  net = {"w": jnp.asarray(rng.normal(size=(3 + 2, 1))), "b": jnp.asarray([0.2])}
  support = (jnp.asarray(rng.normal(size=(10, 3))), jnp.asarray(rng.normal(size=(10, 1))))
  rates = jnp.asarray([0.1, 0.7])
  adapt = S.context(S.unrolled(CAVIA_LOSS, steps=1), 2)
  grad_c = jax.grad(lambda c: CAVIA_LOSS({"params": net, "context": c}, support))(jnp.zeros(2))
  np.testing.assert_allclose(adapt(net, support, step_size=rates)["context"], -rates * grad_c,
                             rtol=1e-12)
  tasks = metajax.tasks.Task(jax.tree.map(lambda a: a[None], support),
                             jax.tree.map(lambda a: a[None], support))
  objective = metajax.meta.meta_objective(adapt, CAVIA_LOSS, learn=("step_size",))
  grads = jax.grad(objective)({"params": net, "step_size": rates}, tasks)
  assert grads["step_size"].shape == (2,) and bool(jnp.all(grads["step_size"] != 0))


def test_cavia_context_starts_at_zero_on_every_task_and_is_not_a_meta_parameter():
  net = {"w": jnp.ones((3, 1)), "b": jnp.zeros(1)}
  adapt = S.context(S.unrolled(CAVIA_LOSS, steps=1, step_size=0.0), 2)
  phi = adapt(net, (jnp.ones((4, 1)), jnp.ones((4, 1))))
  assert phi["context"].tolist() == [0.0, 0.0]  # a zero step: the context stays at its start


# -- learned inner losses ------------------------------------------------------------------------
def ridge_inner_loss(params, batch, loss_params):
  """Squared error plus a learned per-coordinate penalty 0.5 * sum(exp(psi) * w^2)."""
  x, y = batch
  fit = 0.5 * jnp.mean((x @ params - y) ** 2)
  return fit + 0.5 * jnp.sum(jnp.exp(loss_params) * params ** 2)


def query_loss(params, batch):
  x, y = batch
  return 0.5 * jnp.mean((x @ params - y) ** 2)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_learned_inner_loss_meta_gradient_matches_closed_form(solver):
  support, query = _data(4, 10, 3, jnp.float64), _data(5, 8, 3, jnp.float64)
  tasks = metajax.tasks.Task(jax.tree.map(lambda a: a[None], support),
                             jax.tree.map(lambda a: a[None], query))
  adapt = S.learned_loss(SOLVERS[solver](ridge_inner_loss))
  objective = metajax.meta.meta_objective(adapt, query_loss, learn=("loss_params",))
  meta_params = {"params": jnp.asarray([0.3, -0.2, 0.5]),
                 "loss_params": jnp.asarray([-1.0, 0.0, 0.5])}

  def reference(mp):
    f = lambda w: ridge_inner_loss(w, support, mp["loss_params"])
    return query_loss(closed_form(solver, f, mp["params"]), query)

  value, grads = jax.value_and_grad(objective)(meta_params, tasks)
  value_ref, grads_ref = jax.value_and_grad(reference)(meta_params)
  assert rel(value, value_ref) <= RTOL[solver]
  assert rel(grads["loss_params"], grads_ref["loss_params"]) <= RTOL[solver] * 10
  assert rel(grads["params"], grads_ref["params"]) <= RTOL[solver] * 10
  assert float(jnp.abs(grads["loss_params"]).min()) > 1e-4


def ml3_loss(params, batch, loss_params):
  """ML3-style: a small network maps (prediction, target) to a per-example loss."""
  x, y = batch
  pred = x @ params
  h = jnp.tanh(jnp.stack([pred, y, (pred - y) ** 2], -1) @ loss_params["w1"] + loss_params["b1"])
  return jnp.mean(jax.nn.softplus(h @ loss_params["w2"]))


@pytest.mark.parametrize("solver", ["unrolled", "implicit"])
def test_ml3_loss_network_meta_gradient_matches_finite_differences(solver):
  rng = np.random.default_rng(6)
  psi = {"w1": jnp.asarray(rng.normal(size=(3, 4)) * 0.5), "b1": jnp.zeros(4),
         "w2": jnp.asarray(rng.normal(size=4))}
  support, query = _data(8, 10, 3, jnp.float64), _data(9, 8, 3, jnp.float64)
  make = {"unrolled": lambda: S.unrolled(ml3_loss, steps=3, step_size=0.2),
          "implicit": lambda: S.implicit(ml3_loss, reg=2.0, tol=None, max_steps=60,
                                         linear_solver=S.linear_solvers.cg(tol=1e-12))}[solver]
  adapt = S.learned_loss(make())
  theta = jnp.asarray([0.1, -0.3, 0.2])
  outer = lambda p: query_loss(adapt(theta, support, loss_params=p), query)
  grads = jax.grad(outer)(psi)
  for name in psi:  # central differences along a random direction of each leaf
    direction = jnp.asarray(rng.normal(size=psi[name].shape))
    eps = 1e-5
    plus = outer({**psi, name: psi[name] + eps * direction})
    minus = outer({**psi, name: psi[name] - eps * direction})
    fd = (plus - minus) / (2 * eps)
    assert abs(float(jnp.vdot(grads[name], direction)) - float(fd)) <= 1e-6 * max(1.0, abs(fd))


def test_implicit_with_float32_params_and_a_float64_closure_keeps_float32():
  """A learned loss closing over float64 values (x64 on) made the L-BFGS line search fail on
  mismatched dtypes; the proximal objective is now evaluated in the parameters' dtype."""
  support = _data(4, 10, 3, jnp.float32)
  adapt = S.learned_loss(S.implicit(ridge_inner_loss, reg=REG))
  theta = jnp.asarray([0.3, -0.2, 0.5], jnp.float32)
  psi = jnp.zeros(3, jnp.float64)
  phi = adapt(theta, support, loss_params=psi)
  assert phi.dtype == jnp.float32
  ref = closed_form("implicit", lambda w: ridge_inner_loss(w, support, psi),
                    theta.astype(jnp.float64))
  assert rel(phi, ref) <= 1e-4


def test_conv4_film_context_is_the_plain_network_at_zero_and_survives_batch_norm():
  image_shape, x = (4, 4, 1), jax.random.normal(jax.random.key(0), (6, 4, 4, 1))
  Conv4 = metajax.models.Conv4
  params, apply_fn = metajax.models.init_model(Conv4(3, filters=4, blocks=1, context=2),
                                               jax.random.key(1), image_shape)
  plain_params, plain_apply = metajax.models.init_model(Conv4(3, filters=4, blocks=1),
                                                        jax.random.key(1), image_shape)
  shared = {k: v for k, v in params.items() if not k.startswith("FiLM")}
  assert set(shared) == set(plain_params)
  apply = metajax.models.with_context(apply_fn, keyword="context")
  zero = apply({"params": params, "context": jnp.zeros(2)}, x)
  assert float(jnp.max(jnp.abs(zero - plain_apply(shared, x)))) < 1e-6
  moved = apply({"params": params, "context": jnp.asarray([1.0, -1.0])}, x)
  assert float(jnp.max(jnp.abs(moved - zero))) > 1e-3  # batch norm does not cancel FiLM
  # An input-level context (constant channels) is cancelled by the first batch norm, except
  # where SAME padding meets the border: that is why Conv4 takes the context by FiLM.
  with pytest.raises(ValueError, match=r"Conv4 got a context but was built with context=0"):
    plain_apply(plain_params, x, context=jnp.zeros(2))
  with pytest.raises(ValueError, match=r"Conv4 takes a context of shape \(2,\), got \(3,\)"):
    apply_fn(params, x, context=jnp.zeros(3))
  grads = jax.grad(lambda c: jnp.sum(apply({"params": params, "context": c}, x) ** 2))(
      jnp.zeros(2))
  assert float(jnp.abs(grads).max()) > 0  # the context can be adapted from zero


def test_anil_on_a_conv_net_equals_hand_written_head_only_maml():
  """The per-task conv path (task_batching 'unroll' on CPU) against plain JAX: one step of
  0.4 on the head, the body held fixed, meta-gradient for everything."""
  params, apply_fn = metajax.models.init_model(metajax.models.Conv4(3, filters=4, blocks=1),
                                               jax.random.key(0), (4, 4, 1))
  loss = metajax.meta.cross_entropy_loss(apply_fn)
  x = jax.random.normal(jax.random.key(1), (2, 6, 4, 4, 1))
  labels = jnp.tile(jnp.arange(3), (2, 2))
  tasks = metajax.tasks.Task((x, labels), (x + 0.5, labels))
  anil = S.masked(S.unrolled(loss, steps=1, step_size=0.4), S.path_mask("Dense_0"))

  def by_hand(p):
    def task_loss(i):
      support, query = (x[i], labels[i]), (x[i] + 0.5, labels[i])
      g = jax.grad(lambda h: loss({**p, "Dense_0": h}, support))(p["Dense_0"])
      head = jax.tree.map(lambda w, gw: w - 0.4 * gw, p["Dense_0"], g)
      return loss({**p, "Dense_0": head}, query)
    return (task_loss(0) + task_loss(1)) / 2

  for batching in ("unroll",):  # the CPU conv path; vmap is the MLP path tested above
    objective = metajax.meta.meta_objective(anil, loss, task_batching=batching)
    value, grads = jax.value_and_grad(objective)(params, tasks)
    value_ref, grads_ref = jax.value_and_grad(by_hand)(params)
    assert rel(value, value_ref) <= 1e-5
    flat = lambda t: jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(t)])
    # (the conv bias before batch norm has a zero gradient up to round-off: compare as a whole)
    assert rel(flat(grads), flat(grads_ref)) <= 1e-5
    assert float(jnp.abs(grads["Conv_0"]["kernel"]).max()) > 1e-3  # the frozen body learns


def test_review_of_the_wrappers_edge_cases():
  """A new user's probes (session 6): each was a false error or a cryptic one."""
  # path_mask matches whole path components: Dense_1 is not Dense_10.
  params = {f"Dense_{i}": {"kernel": jnp.ones(2)} for i in (1, 10)}
  assert S.path_mask("Dense_1")(params) == {"Dense_1": {"kernel": True},
                                             "Dense_10": {"kernel": False}}
  assert S.path_mask(".*/kernel")(params) == {"Dense_1": {"kernel": True},
                                               "Dense_10": {"kernel": True}}
  # context with a scalar call-time step size on single-array params is not per-parameter.
  phi = S.context(S.unrolled(CAVIA_LOSS, steps=1), 1)(
      {"w": jnp.ones((2, 1)), "b": jnp.zeros(1)}, (jnp.zeros((4, 1)), jnp.ones((4, 1))),
      step_size=0.5)
  assert phi["context"].shape == (1,)
  single = S.context(S.unrolled(metajax.meta.mse_loss(metajax.models.with_context(
      lambda w, x: x @ w)), steps=1), 1)(jnp.ones((2, 1)), (jnp.zeros((4, 1)), jnp.ones((4, 1))),
                                          step_size=0.5)
  assert single["context"].tolist() == [1.0]
  # A shape-based mask function with per-step, per-layer rates for the full params.
  params_ = anil_params(jnp.float64)
  kernels = lambda p: jax.tree.map(lambda x: x.ndim == 2, p)
  adapt = S.masked(S.unrolled(anil_loss, steps=2, per_step=True), kernels)
  rates = metajax.meta.lslr_step_sizes(params_, 2, 0.1)
  phi = adapt(params_, _data(0, 12, 3, jnp.float64), step_size=rates)
  assert bool(jnp.all(phi["head"]["w"] == params_["head"]["w"]))
  assert bool(jnp.any(phi["body"] != params_["body"]))
  # The step index is an int32 array in the input checks too; per_step rates as a list.
  scaled = lambda p, b, k: anil_loss(p, b) * (1 + k.astype(jnp.float64))
  for solver in (S.unrolled(scaled, steps=2, step_size=[0.1, 0.2], per_step=True,
                            step_aware=True),
                 S.masked(S.unrolled(scaled, steps=2, step_aware=True), S.path_mask("head"))):
    assert jax.tree.structure(solver(params_, _data(0, 12, 3, jnp.float64))) == \
        jax.tree.structure(params_)
  # with_context does not truncate the context to an integer input's dtype.
  out = metajax.models.with_context(lambda w, x: x @ w)(
      {"params": jnp.ones((2, 1)), "context": jnp.asarray([0.3])}, jnp.ones((3, 1), jnp.int32))
  assert out.ravel().tolist() == pytest.approx([1.3] * 3)
