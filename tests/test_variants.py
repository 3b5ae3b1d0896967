"""GSAM, FriendlySAM and WSAM on every backend, against the float64 NumPy
reference in `variants_reference.py` (a tanh MLP 4-5-2 with Keras "mse",
gradients by hand, `reference.TanhMLP`; Keras SGD spelled out):

1. Each variant over 8 steps (2 epochs of 4 batches) with SGD(momentum=0.9):
   weights after every step and the per-step diagnostics. GSAM (alpha 0.4,
   stable) and its rho schedule (rho follows a warm-up/cosine learning rate,
   clipped to [rho_min, rho]); FriendlySAM (sigma 1 and 0.5, stable); WSAM
   (decoupled or not, gamma 0.9 and 0.5, stable, a learning-rate schedule
   with the decoupled term). Each test also checks that a nearby wrong
   variant would differ at its tolerance.
2. (torch) against pytorch_optimizer's GSAM (with ProportionScheduler),
   FriendlySAM and WSAM on the same torch.nn model, within float32
   rounding; where the definitions differ (F-SAM's momentum convention,
   pytorch_optimizer's unclipped rho), each side is checked against the
   reference written in its own convention.
3. model.save / load_model mid-training resumes exactly (F-SAM's m, WSAM's
   decoupled term).
4. num_batch_splits=2 (each chunk its own g, e, update; F-SAM's m the
   chunks' mean).
5. sam_probability=0.5, seed=3 (skipped steps: g to the base optimizer, no
   WSAM term, F-SAM's m unchanged).
6. mixed_float16: finite, close to the reference.
7. Bad arguments raise ValueError naming the argument and value.
8. get_config / from_config round trips.
"""

import keras
import numpy as np
import pytest
import reference as ref
import variants_reference as vref
from efficient_reference import step_draws
from keras import ops

import keras_ssam

BACKEND = keras.backend.backend()
N_IN, N_HIDDEN, N_OUT = 4, 5, 2
BATCH = 4
RHO, LR, MOMENTUM = 0.1, 0.1, 0.9
KERAS_CLASSES = {"gsam": keras_ssam.GSAM, "friendly": keras_ssam.FriendlySAM, "wsam": keras_ssam.WSAM}
DIAGNOSTICS = vref.DIAGNOSTICS


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def _problem(seed, n=16):
    """Initial MLP parameters (float32 values held in float64) and float32
    data of a smooth regression task."""
    rng = np.random.default_rng(seed)
    params = ref.TanhMLP.init_params(rng, N_IN, N_HIDDEN, N_OUT)
    x = rng.standard_normal((n, N_IN)).astype(np.float32)
    t = np.sin(x @ rng.standard_normal((N_IN, N_OUT))) + 0.1 * rng.standard_normal((n, N_OUT))
    return params, x, t.astype(np.float32)


def _batches(x, y, epochs=2, batch_size=BATCH):
    """The batches, in order, as float64 (the values are float32's)."""
    return [
        (x[s:s + batch_size].astype(np.float64), y[s:s + batch_size].astype(np.float64))
        for _ in range(epochs)
        for s in range(0, len(x), batch_size)
    ]


def _inner(params, float32_head=False):
    inp = keras.Input((N_IN,))
    out = keras.layers.Dense(N_HIDDEN, activation="tanh", name="hidden")(inp)
    out = keras.layers.Dense(N_OUT, name="out")(out)
    if float32_head:
        out = keras.layers.Activation("linear", dtype="float32", name="head")(out)
    inner = keras.Model(inp, out)
    inner.set_weights([p.astype(np.float32) for p in params])
    return inner


def _sam_model(params, optimizer, *, diagnostics=True, num_batch_splits=1, float32_head=False):
    inner = _inner(params, float32_head=float32_head)
    model = keras_ssam.SAMModel(inner, diagnostics=diagnostics, num_batch_splits=num_batch_splits)
    model.compile(optimizer=optimizer, loss="mse")
    return model, inner


def _weights(inner):
    return [np.asarray(w, np.float64) for w in inner.get_weights()]


def _train_steps(model, inner, batches, before_step=None):
    """One `train_on_batch` per batch; the weights and logs after each.
    `before_step()` is called (and its values collected) before each."""
    weights, logs, seen = [], [], []
    for xb, yb in batches:
        if before_step is not None:
            seen.append(before_step())
        model.reset_metrics()
        logs.append(model.train_on_batch(xb.astype("float32"), yb.astype("float32"), return_dict=True))
        weights.append(_weights(inner))
    return weights, logs, seen


def _check_trajectory(got, want, rtol=1e-5, atol=1e-6, what=""):
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        for i, (a, b) in enumerate(zip(g, w)):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"{what} weight {i} after step {step}")


def _atol(kind, kwargs):
    """Absolute tolerance of a float32 trajectory against the reference.
    WSAM's update g + a (u - g), a = gamma / (1 - gamma), brings the float32
    rounding of u and g (~1e-7 relative) back ~(1 + 2a) larger, and momentum
    carries it: measured 2.5e-6 after 8 steps with a = 9 (the same run in
    float64 on TensorFlow is 8e-8 from the reference), hence 1e-6 (1 + a)."""
    if kind == "wsam":
        gamma = kwargs.get("gamma", 0.9)
        return 1e-6 * (1 + gamma / (1 - gamma))
    return 1e-6


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(p) - np.asarray(q)))) for p, q in zip(a, b))


def _assert_differs(a, b, atol, what):
    """Guard that a wrong behaviour would be detected at the test's tolerance."""
    diff = _max_diff(a, b)
    assert diff > 10 * atol, f"test cannot discriminate: {what} differs from the expectation by only {diff}"


def _check_step_logs(logs, records):
    """Per step: `sam_step_fraction` 1 exactly on the steps that ran the
    perturbed pass; there, the diagnostics equal the reference's (chunk
    means with batch splits). Float32 weights drift from the float64
    trajectory by ~1e-7 relative per step; `sharpness` is a difference of
    losses: rtol 1e-4, atol 1e-6."""
    assert [log["sam_step_fraction"] for log in logs] == [float(r["perturbed"]) for r in records]
    for step, (log, rec) in enumerate(zip(logs, records)):
        np.testing.assert_allclose(log["loss"], rec["loss"], rtol=1e-5, err_msg=f"loss, step {step}")
        if rec["perturbed"]:
            for key in DIAGNOSTICS:
                np.testing.assert_allclose(log[key], rec[key], rtol=1e-4, atol=1e-6, err_msg=f"{key}, step {step}")


def _make(kind, base, **kwargs):
    return KERAS_CLASSES[kind](base, **kwargs)


def _reference(kind, params, batches, *, lr=LR, momentum=MOMENTUM, **kwargs):
    """The reference trajectory and records; keras_ssam's argument names
    (`sam_probability` is the reference's `probability`)."""
    kwargs = dict(kwargs)
    if "sam_probability" in kwargs:
        kwargs["probability"] = kwargs.pop("sam_probability")
    kwargs.setdefault("rho", RHO)
    variant = vref.Variant(ref.TanhMLP.loss_and_grads, kind, **kwargs)
    return vref.run(variant, params, batches, vref.KerasSGD(lr, momentum))


class TableSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The learning rate `values[min(step, len - 1)]` (float32)."""

    def __init__(self, values):
        self.values = [float(v) for v in values]

    def __call__(self, step):
        table = ops.convert_to_tensor(np.asarray(self.values, np.float32))
        index = ops.minimum(ops.cast(step, "int32"), len(self.values) - 1)
        return ops.take(table, index)

    def get_config(self):
        return {"values": self.values}


def _current_rho(optimizer):
    return float(ops.convert_to_numpy(optimizer.current_rho()))


def _schedule_values(schedule, steps):
    """The schedule's float32 learning rates at 0..steps-1, as Python floats."""
    return [float(np.float32(ops.convert_to_numpy(schedule(t)))) for t in range(steps)]


# ---------------------------------------------------------------------------
# 1. Each variant against the reference.
# ---------------------------------------------------------------------------

CASES = {
    "GSAM": ("gsam", dict(alpha=0.4)),
    "GSAM-stable": ("gsam", dict(alpha=0.4, stable=True)),
    "FriendlySAM-sigma1": ("friendly", dict(sigma=1.0, lmbda=0.9)),
    "FriendlySAM-sigma0.5": ("friendly", dict(sigma=0.5, lmbda=0.9)),
    "FriendlySAM-sigma1-stable": ("friendly", dict(sigma=1.0, lmbda=0.9, stable=True)),
    "WSAM-decoupled-gamma0.9": ("wsam", dict(gamma=0.9, decouple=True)),
    "WSAM-coupled-gamma0.9": ("wsam", dict(gamma=0.9, decouple=False)),
    "WSAM-decoupled-gamma0.5": ("wsam", dict(gamma=0.5, decouple=True)),
    "WSAM-coupled-gamma0.5": ("wsam", dict(gamma=0.5, decouple=False)),
    "WSAM-decoupled-stable": ("wsam", dict(gamma=0.9, decouple=True, stable=True)),
}

# Nearby wrong definitions each case must be distinguishable from.
WRONG = {
    "gsam": {"SAM (alpha=0)": dict(alpha=0.0), "the opposite sign of alpha's correction": dict(alpha=-0.4)},
    "friendly": {
        "SAM (sigma=0)": dict(sigma=0.0),
        "pytorch_optimizer's momentum convention": dict(convention="pytorch_optimizer"),
    },
    "wsam": {"the other `decouple`": "flip-decouple", "SAM (u instead of WSAM's mix)": "sam"},
}


def _wrong_references(kind, params, batches, kwargs):
    for what, over in WRONG[kind].items():
        if over == "flip-decouple":
            over = dict(decouple=not kwargs["decouple"])
        elif over == "sam":
            # SAM's update u: the friendly variant with sigma=0 is SAM.
            rest = {k: v for k, v in kwargs.items() if k in ("stable", "rho")}
            yield what, _reference("friendly", params, batches, sigma=0.0, **rest)[0]
            continue
        yield what, _reference(kind, params, batches, **{**kwargs, **over})[0]
    if kwargs.get("stable"):
        yield "stable=False", _reference(kind, params, batches, **{**kwargs, "stable": False})[0]


@pytest.mark.parametrize("case", list(CASES))
def test_variant_matches_reference(case):
    """8 steps, SGD(0.1, momentum=0.9), rho=0.1: the weights after every step
    equal the float64 reference to float32 rounding (rtol 1e-5, atol 1e-6),
    and the diagnostics of every step too. The wrong variants listed in
    `WRONG` (and stable=False for the stable cases) differ by > 1e-5."""
    kind, kwargs = CASES[case]
    params, x, y = _problem(seed=11)
    batches = _batches(x, y)
    model, inner = _sam_model(params, _make(kind, keras.optimizers.SGD(LR, momentum=MOMENTUM), rho=RHO, **kwargs))
    got, logs, _ = _train_steps(model, inner, batches)
    want, records = _reference(kind, params, batches, **kwargs)
    atol = _atol(kind, kwargs)
    _check_trajectory(got, want, atol=atol)
    _check_step_logs(logs, records)
    for what, other in _wrong_references(kind, params, batches, kwargs):
        if case == "WSAM-coupled-gamma0.5" and what.startswith("SAM"):
            # gamma = 1/2 without decoupling is SAM, exactly.
            _check_trajectory(other, want, rtol=1e-12, atol=1e-12)
            continue
        _assert_differs(other[-1], want[-1], atol, what)


def test_reference_wsam_coupled_half_is_sam_and_friendly_sigma0_is_sam():
    """Reference self-checks: WSAM(gamma=1/2, decouple=False) and F-SAM
    (sigma=0) are SAM (`reference.sam_step_gradient`), and GSAM(alpha=0) is
    SAM too."""
    params, x, y = _problem(seed=12)
    batches = _batches(x, y, epochs=1)
    sam, _ = ref.train(ref.TanhMLP.loss_and_grads, params, batches, ref.SAMConfig(rho=RHO),
                       ref.SGD(LR, MOMENTUM))
    for kind, kwargs in (("wsam", dict(gamma=0.5, decouple=False)), ("friendly", dict(sigma=0.0)),
                         ("gsam", dict(alpha=0.0))):
        got, _ = _reference(kind, params, batches, **kwargs)
        _check_trajectory(got, sam, rtol=1e-12, atol=1e-12, what=kind)


SCHEDULE_CASES = {
    "GSAM-rho-follows-lr": ("gsam", dict(alpha=0.4, rho_min=0.02, lr_max=0.08, lr_min=0.02)),
    "GSAM-stable-rho-follows-lr": ("gsam", dict(alpha=0.3, rho_min=0.01, lr_max=0.08, lr_min=0.02, stable=True)),
    "WSAM-decoupled-lr-schedule": ("wsam", dict(gamma=0.9, decouple=True)),
}


@pytest.mark.parametrize("case", list(SCHEDULE_CASES))
def test_variant_with_learning_rate_schedule(case):
    """SGD(CosineDecay(0.0, 6, warmup_target=0.1, warmup_steps=3),
    momentum=0.9), 8 steps: the learning rate warms up from 0 (below lr_min
    = 0.02) to 0.1 (above lr_max = 0.08) and decays to ~0.007 (below lr_min
    again).

    GSAM's rho_t = clip(rho_min + (rho - rho_min)(lr_t - lr_min)/(lr_max -
    lr_min), rho_min, rho) with lr_t the learning rate of the step (before
    the iteration advances): `current_rho()` read before each step equals
    the reference's rho_t and stays in [rho_min, rho] although the formula
    leaves that range at both ends (checked); the weights match the
    reference; unclipped rho, or rho_t from the next step's learning rate,
    differ. WSAM: the decoupled term takes the step's learning rate; the next
    step's differs."""
    kind, kwargs = SCHEDULE_CASES[case]
    schedule = keras.optimizers.schedules.CosineDecay(0.0, 6, warmup_target=0.1, warmup_steps=3)
    lrs = _schedule_values(schedule, 9)
    lr = lambda t: lrs[t]  # noqa: E731
    params, x, y = _problem(seed=13)
    batches = _batches(x, y)
    opt = _make(kind, keras.optimizers.SGD(schedule, momentum=MOMENTUM), rho=RHO, **kwargs)
    model, inner = _sam_model(params, opt)
    got, logs, rhos = _train_steps(model, inner, batches, before_step=lambda: _current_rho(opt))
    want, records = _reference(kind, params, batches, lr=lr, **kwargs)
    assert [r["lr"] for r in records] == lrs[:8]
    atol = _atol(kind, kwargs)
    _check_trajectory(got, want, atol=atol)
    _check_step_logs(logs, records)
    if kind == "gsam":
        rho_min = kwargs["rho_min"]
        raw = [r["raw_rho"] for r in records]
        assert min(raw) < 0 < rho_min and max(raw) > RHO, f"setup: the clip is not exercised, {raw}"
        np.testing.assert_allclose(rhos, [r["rho"] for r in records], rtol=1e-6, atol=1e-8)
        assert all(rho_min - 1e-7 <= r <= RHO + 1e-7 for r in rhos), rhos
        assert rhos[0] == pytest.approx(rho_min) and rhos[3] == pytest.approx(RHO)
        unclipped, _ = _reference(kind, params, batches, lr=lr, clip_rho=False, **kwargs)
        _assert_differs(unclipped[-1], want[-1], atol, "unclipped rho")
    # rho_t / the decoupled term from the learning rate after the iteration advanced.
    variant = vref.Variant(ref.TanhMLP.loss_and_grads, kind, rho=RHO, **kwargs)
    late, _ = vref.run(variant, params, batches, vref.KerasSGD(lr, MOMENTUM), lr_shift=1)
    _assert_differs(late[-1], want[-1], atol, "the next step's learning rate for rho / the decoupled term")


# ---------------------------------------------------------------------------
# 2. pytorch_optimizer (torch).
# ---------------------------------------------------------------------------


def _torch_model(params, dtype):
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(N_IN, N_HIDDEN), torch.nn.Tanh(), torch.nn.Linear(N_HIDDEN, N_OUT))
    model = model.to(dtype)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(params[0].T, dtype=dtype))
        model[0].bias.copy_(torch.tensor(params[1], dtype=dtype))
        model[2].weight.copy_(torch.tensor(params[2].T, dtype=dtype))
        model[2].bias.copy_(torch.tensor(params[3], dtype=dtype))
    return model


def _torch_weights(model):
    return [
        model[0].weight.detach().cpu().numpy().T.astype(np.float64),
        model[0].bias.detach().cpu().numpy().astype(np.float64),
        model[2].weight.detach().cpu().numpy().T.astype(np.float64),
        model[2].bias.detach().cpu().numpy().astype(np.float64),
    ]


def _torch_closure(model, optimizer, xb, yb, dtype):
    import torch

    xt, yt = torch.tensor(xb, dtype=dtype), torch.tensor(yb, dtype=dtype)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xt), yt)  # Keras "mse": mean over all
        loss.backward()
        return loss

    return closure


def _torch_two_step(make_optimizer, params, batches, dtype):
    """pytorch_optimizer's FriendlySAM / WSAM driven as their `step`: the
    gradient at w, `first_step(zero_grad=True)`, the gradient at w + e,
    `second_step()`."""
    model = _torch_model(params, dtype)
    opt = make_optimizer(model)
    traj = []
    for xb, yb in batches:
        closure = _torch_closure(model, opt, xb, yb, dtype)
        closure()
        opt.first_step(zero_grad=True)
        closure()
        opt.second_step()
        traj.append(_torch_weights(model))
    return traj


def _torch_gsam(params, batches, dtype, *, lrs, momentum, rho, rho_min, lr_max, lr_min, alpha):
    """pytorch_optimizer's GSAM driven as its `step` (gradient at w,
    `perturb_weights(rho_t)`, gradient at w + e, `gradient_decompose(alpha)`,
    `un_perturb()`, the base SGD step), then the learning-rate scheduler and
    `update_rho_t()` (its ProportionScheduler reads the new rate), as its
    documentation says."""
    import torch
    from pytorch_optimizer import GSAM, ProportionScheduler

    model = _torch_model(params, dtype)
    base = torch.optim.SGD(model.parameters(), lr=lrs[0], momentum=momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(base, lambda s: lrs[min(s, len(lrs) - 1)] / lrs[0])
    rho_scheduler = ProportionScheduler(scheduler, max_lr=lr_max, min_lr=lr_min, max_value=rho, min_value=rho_min)
    opt = GSAM(model.parameters(), base, model, rho_scheduler, alpha=alpha)
    traj, rhos = [], []
    for xb, yb in batches:
        closure = _torch_closure(model, base, xb, yb, dtype)
        rhos.append(float(opt.rho_t))
        closure()
        opt.perturb_weights(rho=opt.rho_t)
        closure()
        opt.gradient_decompose(alpha)
        opt.un_perturb()
        base.step()
        scheduler.step()
        opt.update_rho_t()
        traj.append(_torch_weights(model))
    return traj, rhos


torch_only = pytest.mark.skipif(BACKEND != "torch", reason="compares with pytorch_optimizer, a torch library")


@torch_only
@pytest.mark.parametrize("stable_lr", ["constant-lr-momentum", "lr-schedule-inside-range"])
def test_gsam_matches_pytorch_optimizer(stable_lr):
    """keras_ssam.GSAM equals pytorch_optimizer.GSAM on the same MLP, data
    and SGD over 8 steps, within float32 rounding: with a constant learning
    rate and momentum 0.9 (ProportionScheduler with max_lr == min_lr: rho
    constant), and with rho following a learning-rate table that stays in
    [lr_min, lr_max] (momentum 0: torch's SGD applies the rate to the whole
    velocity, Keras's to the new gradient only, which differ under a
    changing rate).

    pytorch_optimizer adds eps (1e-12) to its cosine's denominators,
    `<g, g_s> / (||g_s|| ||g|| + eps) * ||g|| / (||g_s|| + eps)` where
    keras_ssam has `<g, g_s> / ||g_s||^2` (safe-divided): the float64
    reference with those eps terms matches pytorch_optimizer in float64 to
    ~1e-7 (its norms are float32: `get_global_gradient_norm` returns a
    float32 squared norm)."""
    import torch

    params, x, y = _problem(seed=14)
    batches = _batches(x, y)
    alpha = 0.4
    if stable_lr == "constant-lr-momentum":
        lrs, momentum = [LR] * 9, MOMENTUM
        sched = dict(rho_min=RHO, lr_max=LR, lr_min=LR)  # torch: max_lr == min_lr gives max_value
        keras_kwargs, ref_kwargs = {}, {}
        keras_lr = LR
    else:
        lrs, momentum = [0.05, 0.1, 0.08, 0.06, 0.04, 0.03, 0.025, 0.02, 0.02], 0.0
        sched = dict(rho_min=0.01, lr_max=0.1, lr_min=0.02)
        keras_kwargs = ref_kwargs = sched
        keras_lr = TableSchedule(lrs)
    torch32, rhos32 = _torch_gsam(params, batches, torch.float32, lrs=lrs, momentum=momentum, rho=RHO,
                                  alpha=alpha, **sched)
    torch64, _ = _torch_gsam(params, batches, torch.float64, lrs=lrs, momentum=momentum, rho=RHO,
                             alpha=alpha, **sched)
    opt = keras_ssam.GSAM(keras.optimizers.SGD(keras_lr, momentum=momentum), rho=RHO, alpha=alpha, **keras_kwargs)
    model, inner = _sam_model(params, opt)
    got, _, rhos = _train_steps(model, inner, batches, before_step=lambda: _current_rho(opt))
    np.testing.assert_allclose(rhos, rhos32, rtol=1e-6)
    _check_trajectory(got, torch32, rtol=1e-5, atol=1e-6, what="keras vs pytorch_optimizer")

    lr_fn = lambda t: lrs[t]  # noqa: E731
    want, _ = _reference("gsam", params, batches, lr=lr_fn, momentum=momentum, alpha=alpha, **ref_kwargs)
    with_eps, _ = _reference("gsam", params, batches, lr=lr_fn, momentum=momentum, alpha=alpha,
                             gsam_eps=1e-12, **ref_kwargs)
    _check_trajectory(got, want, what="keras vs reference")
    _check_trajectory(torch64, with_eps, rtol=1e-6, atol=1e-7, what="pytorch_optimizer float64 vs reference+eps")
    sam, _ = _reference("gsam", params, batches, lr=lr_fn, momentum=momentum, alpha=0.0, **ref_kwargs)
    _assert_differs(sam[-1], torch32[-1], 1e-6, "SAM (alpha=0)")


@torch_only
def test_gsam_rho_clip_differs_from_pytorch_optimizer_where_lr_leaves_the_range():
    """A learning-rate table below lr_min = 0.02 (0.005, 0.01) and above
    lr_max = 0.1 (0.12), rho_min = 0.005: pytorch_optimizer's ProportionScheduler does not clip (rho_0 is
    negative: the ascent goes downhill), keras_ssam does. Each equals the
    reference in its own convention (pytorch_optimizer in float64, with its
    eps terms, to ~1e-7; keras in float32), and the two differ."""
    import torch

    params, x, y = _problem(seed=15)
    batches = _batches(x, y)
    lrs = [0.005, 0.05, 0.12, 0.1, 0.06, 0.03, 0.01, 0.02, 0.02]
    sched = dict(rho_min=0.005, lr_max=0.1, lr_min=0.02)
    torch64, rhos = _torch_gsam(params, batches, torch.float64, lrs=lrs, momentum=0.0, rho=RHO, alpha=0.4, **sched)
    assert rhos[0] < 0 and rhos[2] > RHO, f"setup: {rhos}"
    opt = keras_ssam.GSAM(keras.optimizers.SGD(TableSchedule(lrs), momentum=0.0), rho=RHO, alpha=0.4, **sched)
    model, inner = _sam_model(params, opt)
    got, _, _ = _train_steps(model, inner, batches)
    lr_fn = lambda t: lrs[t]  # noqa: E731
    clipped, _ = _reference("gsam", params, batches, lr=lr_fn, momentum=0.0, alpha=0.4, **sched)
    unclipped, records = _reference("gsam", params, batches, lr=lr_fn, momentum=0.0, alpha=0.4, clip_rho=False,
                                    gsam_eps=1e-12, **sched)
    np.testing.assert_allclose(rhos, [r["raw_rho"] for r in records], rtol=1e-12)
    _check_trajectory(got, clipped, what="keras vs clipped reference")
    _check_trajectory(torch64, unclipped, rtol=1e-6, atol=1e-7, what="pytorch_optimizer vs unclipped reference")
    _assert_differs(got[-1], torch64[-1], 1e-6, "pytorch_optimizer's unclipped rho")


def _torch_friendly(params, batches, dtype, sigma, lmbda=0.9):
    import torch
    from pytorch_optimizer import FriendlySAM as TorchFriendlySAM

    return _torch_two_step(
        lambda model: TorchFriendlySAM(model.parameters(), torch.optim.SGD, rho=RHO, sigma=sigma, lmbda=lmbda,
                                       lr=LR, momentum=MOMENTUM),
        params, batches, dtype,
    )


@torch_only
@pytest.mark.parametrize("sigma", [1.0, 0.5])
def test_friendly_sam_conventions_against_pytorch_optimizer(sigma):
    """pytorch_optimizer.FriendlySAM (float64) equals the reference in its
    convention (m_1 = g_1, d_1 = g_1, then d_t = g_t - sigma m_{t-1}) to
    ~1e-7 (its ascent norm is float32), and in float32 to float32 rounding;
    keras_ssam.FriendlySAM equals the reference in the paper's (m_0 = 0, d_t
    = g_t - sigma m_t). The first step is the same in both (d_1 is
    proportional to g_1); from the second on they differ, for sigma = 1
    too: the averages start from m_0 = 0 and m_1 = g_1."""
    import torch

    params, x, y = _problem(seed=16)
    batches = _batches(x, y)
    torch32 = _torch_friendly(params, batches, torch.float32, sigma)
    torch64 = _torch_friendly(params, batches, torch.float64, sigma)
    theirs, _ = _reference("friendly", params, batches, sigma=sigma, convention="pytorch_optimizer")
    ours, _ = _reference("friendly", params, batches, sigma=sigma)
    _check_trajectory(torch64, theirs, rtol=1e-6, atol=1e-7, what="pytorch_optimizer float64")
    _check_trajectory(torch32, theirs, what="pytorch_optimizer float32")
    model, inner = _sam_model(params, keras_ssam.FriendlySAM(keras.optimizers.SGD(LR, momentum=MOMENTUM),
                                                             rho=RHO, sigma=sigma, lmbda=0.9))
    got, _, _ = _train_steps(model, inner, batches)
    _check_trajectory(got, ours, what="keras vs paper reference")
    _check_trajectory(got[:1], torch32[:1], what="first step, keras vs pytorch_optimizer")
    _assert_differs(got[-1], torch32[-1], 1e-6, "the other convention")


@torch_only
@pytest.mark.parametrize("gamma,decouple", [(0.9, True), (0.9, False), (0.5, True)])
def test_wsam_matches_pytorch_optimizer(gamma, decouple):
    """keras_ssam.WSAM equals pytorch_optimizer.WSAM (driven by first_step /
    second_step, SGD(0.1, momentum=0.9)) over 8 steps within float32
    rounding, decoupled (w -= lr a (g_s - g) after the base step) or not
    (lerp to g + a (g_s - g)). pytorch_optimizer's ascent norm is
    `get_global_gradient_norm(..., weight_adaptive=True)`, which weights by
    |w| only for groups with `adaptive=True`: with adaptive=False it is the
    plain ||g|| (in float32), as ours. The reference equals
    pytorch_optimizer in float64 to ~1e-7."""
    import torch
    from pytorch_optimizer import WSAM as TorchWSAM

    params, x, y = _problem(seed=17)
    batches = _batches(x, y)

    def run_torch(dtype):
        return _torch_two_step(
            lambda model: TorchWSAM(model, model.parameters(), torch.optim.SGD, rho=RHO, gamma=gamma,
                                    decouple=decouple, lr=LR, momentum=MOMENTUM),
            params, batches, dtype,
        )

    torch32, torch64 = run_torch(torch.float32), run_torch(torch.float64)
    model, inner = _sam_model(params, keras_ssam.WSAM(keras.optimizers.SGD(LR, momentum=MOMENTUM), rho=RHO,
                                                      gamma=gamma, decouple=decouple))
    got, _, _ = _train_steps(model, inner, batches)
    atol = _atol("wsam", dict(gamma=gamma))
    _check_trajectory(got, torch32, atol=atol, what="keras vs pytorch_optimizer")
    want, _ = _reference("wsam", params, batches, gamma=gamma, decouple=decouple)
    _check_trajectory(torch64, want, rtol=1e-6, atol=1e-7, what="pytorch_optimizer float64 vs reference")
    other, _ = _reference("wsam", params, batches, gamma=gamma, decouple=not decouple)
    _assert_differs(other[-1], torch32[-1], atol, "the other `decouple`")


# ---------------------------------------------------------------------------
# 3. Save and load mid-training.
# ---------------------------------------------------------------------------

RESUME_CASES = {
    "FriendlySAM-sigma0.5": ("friendly", dict(sigma=0.5, lmbda=0.9)),
    "FriendlySAM-stable-p0.6": ("friendly", dict(sigma=1.0, lmbda=0.8, stable=True, sam_probability=0.6, seed=5)),
    "WSAM-decoupled": ("wsam", dict(gamma=0.9, decouple=True)),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_save_load_mid_training_resumes_exactly(case, tmp_path):
    """3 steps, `model.save` (.keras), `keras.models.load_model`, 3 more
    steps equal 6 uninterrupted steps (to 1e-6) and the reference: F-SAM's
    m, the base momentum, the iteration count (and the seed) are restored;
    WSAM's decoupled setting too. Losing F-SAM's m at loading (restarting
    from m = 0) would differ (checked)."""
    kind, kwargs = RESUME_CASES[case]
    params, x, y = _problem(seed=18, n=24)
    batches = _batches(x, y, epochs=1)
    assert len(batches) == 6

    def make():
        return _sam_model(params, _make(kind, keras.optimizers.SGD(LR, momentum=MOMENTUM), rho=RHO, **kwargs),
                          diagnostics=False)

    model, inner = make()
    straight, _, _ = _train_steps(model, inner, batches)

    model, inner = make()
    first, _, _ = _train_steps(model, inner, batches[:3])
    path = str(tmp_path / "variant.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, keras_ssam.SAMModel)
    assert type(loaded.optimizer) is KERAS_CLASSES[kind]
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert int(ops.convert_to_numpy(loaded.optimizer.iterations)) == 3
    if kind == "friendly":
        assert len(loaded.optimizer.state_variables()) == len(model.optimizer.state_variables()) == 4
        for a, b in zip(loaded.optimizer.state_variables(), model.optimizer.state_variables()):
            np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))
    rest, _, _ = _train_steps(loaded, loaded.model, batches[3:])
    _check_trajectory(first + rest, straight, rtol=1e-6, atol=1e-7, what="resumed vs straight")

    want, records = _reference(kind, params, batches, **kwargs)
    _check_trajectory(straight, want, atol=_atol(kind, kwargs))
    if kind == "friendly":
        variant = vref.Variant(ref.TanhMLP.loss_and_grads, kind, rho=RHO,
                               **{("probability" if k == "sam_probability" else k): v for k, v in kwargs.items()})
        opt = vref.KerasSGD(LR, MOMENTUM)
        lost, _ = vref.run(variant, params, batches[:3], opt)
        variant.m = None
        lost_rest, _ = vref.run(variant, lost[-1], batches[3:], opt)
        _assert_differs(lost_rest[-1], want[-1], 1e-6, "F-SAM's m reset at loading")


# ---------------------------------------------------------------------------
# 4. num_batch_splits.
# ---------------------------------------------------------------------------

SPLIT_CASES = {
    "GSAM": ("gsam", dict(alpha=0.4)),
    "GSAM-stable": ("gsam", dict(alpha=0.4, stable=True)),
    "FriendlySAM-sigma0.5": ("friendly", dict(sigma=0.5, lmbda=0.9)),
    "FriendlySAM-sigma1-stable": ("friendly", dict(sigma=1.0, lmbda=0.9, stable=True)),
    "WSAM-decoupled": ("wsam", dict(gamma=0.9, decouple=True)),
    "WSAM-coupled": ("wsam", dict(gamma=0.8, decouple=False)),
}


@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_num_batch_splits(case):
    """num_batch_splits=2 on batches of 4, 8 steps: each half-batch its own
    g, e, g_s, gamma (and GSAM's c, WSAM's term); the update is the halves'
    mean; F-SAM: each half's d uses m_t from its own gradient, the new m is
    the mean. The diagnostics are the halves' means. Without splitting the
    trajectory differs (checked); for F-SAM, so does a d from the whole
    batch's m_t."""
    kind, kwargs = SPLIT_CASES[case]
    params, x, y = _problem(seed=19)
    batches = _batches(x, y)
    opt = _make(kind, keras.optimizers.SGD(LR, momentum=MOMENTUM), rho=RHO, **kwargs)
    model, inner = _sam_model(params, opt, num_batch_splits=2)
    got, logs, _ = _train_steps(model, inner, batches)
    want, records = _reference(kind, params, batches, splits=2, **kwargs)
    assert all(len(r["chunks"]) == 2 for r in records)
    atol = _atol(kind, kwargs)
    _check_trajectory(got, want, atol=atol)
    _check_step_logs(logs, records)
    whole, _ = _reference(kind, params, batches, **kwargs)
    _assert_differs(whole[-1], want[-1], atol, "no batch splitting")


def test_reference_friendly_chunks_average_the_momentum():
    """Reference self-check: with splits=2, F-SAM's new m is lmbda m + (1 -
    lmbda) * (the chunks' mean gradient), which is the whole batch's for
    equal chunks and a mean loss."""
    params, x, y = _problem(seed=19)
    batches = _batches(x, y, epochs=1)
    variant = vref.Variant(ref.TanhMLP.loss_and_grads, "friendly", rho=RHO, sigma=0.5, lmbda=0.9, splits=2)
    _, records = vref.run(variant, params, batches, vref.KerasSGD(LR, MOMENTUM))
    m = [np.zeros_like(p) for p in params]
    for rec in records:
        g = [np.mean(parts, axis=0) for parts in zip(*[c["grads"] for c in rec["chunks"]])]
        m = [0.9 * a + 0.1 * b for a, b in zip(m, g)]
        _check_trajectory([rec["m"]], [m], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------
# 5. sam_probability.
# ---------------------------------------------------------------------------

PROBABILITY_CASES = {
    "GSAM": ("gsam", dict(alpha=0.4)),
    "FriendlySAM-sigma0.5": ("friendly", dict(sigma=0.5, lmbda=0.9)),
    "WSAM-decoupled": ("wsam", dict(gamma=0.9, decouple=True)),
    "WSAM-coupled": ("wsam", dict(gamma=0.9, decouple=False)),
}


@pytest.mark.parametrize("case", list(PROBABILITY_CASES))
def test_sam_probability(case):
    """sam_probability=0.5, seed=3, 8 steps: the perturbed pass runs exactly
    on the steps NumPy's draw picks (both kinds occur); a skipped step hands
    the base optimizer g, WSAM (decoupled) adds no term, F-SAM's m is left
    as is. Updating F-SAM's m on the skipped steps too, or applying the
    perturbed step everywhere, differs (checked)."""
    kind, kwargs = PROBABILITY_CASES[case]
    kwargs = dict(kwargs, sam_probability=0.5, seed=3)
    mask = (step_draws(3, range(8)) < 0.5).tolist()
    assert 0 < sum(mask) < 8, "setup"
    params, x, y = _problem(seed=20)
    batches = _batches(x, y)
    model, inner = _sam_model(params, _make(kind, keras.optimizers.SGD(LR, momentum=MOMENTUM), rho=RHO, **kwargs))
    got, logs, _ = _train_steps(model, inner, batches)
    want, records = _reference(kind, params, batches, **kwargs)
    assert [r["perturbed"] for r in records] == mask
    atol = _atol(kind, kwargs)
    _check_trajectory(got, want, atol=atol)
    _check_step_logs(logs, records)
    every, _ = _reference(kind, params, batches, **{k: v for k, v in kwargs.items() if k != "sam_probability"})
    _assert_differs(every[-1], want[-1], atol, "the perturbed step on every step")
    if kind == "friendly":
        # m updated on the skipped steps as well (wrong).
        variant = vref.Variant(ref.TanhMLP.loss_and_grads, kind, rho=RHO, sigma=0.5, lmbda=0.9,
                               probability=0.5, seed=3)
        opt, w, wrong = vref.KerasSGD(LR, MOMENTUM), [np.array(p) for p in params], []
        for xb, yb in batches:
            t = opt.iterations
            base, _, rec = variant.step(w, xb, yb, t, LR)
            if not rec["perturbed"]:
                m = variant.m if variant.m is not None else [np.zeros_like(p) for p in params]
                variant.m = [0.9 * a + 0.1 * b for a, b in zip(m, rec["grads"])]
            w = opt.apply(w, base)
            wrong.append(w)
        _assert_differs(wrong[-1], want[-1], 1e-6, "F-SAM's m updated on skipped steps")


# ---------------------------------------------------------------------------
# 6. Mixed precision.
# ---------------------------------------------------------------------------

MIXED_CASES = {
    "GSAM": ("gsam", dict(alpha=0.4)),
    "FriendlySAM": ("friendly", dict(sigma=0.5, lmbda=0.9)),
    "WSAM-decoupled": ("wsam", dict(gamma=0.9, decouple=True)),
    "WSAM-coupled-stable": ("wsam", dict(gamma=0.8, decouple=False, stable=True)),
}


@pytest.mark.parametrize("case", list(MIXED_CASES))
def test_mixed_float16(case):
    """Under mixed_float16 (compile wraps the SAM optimizer in a
    LossScaleOptimizer, scale 2^15; the Dense layers compute in float16, a
    float32 head), 6 steps stay finite, skip no step (the scale stays
    2^15), and stay within float16 rounding (atol 5e-3 on O(0.5) weights)
    of the float32 run and the reference. A loss scale left in F-SAM's m,
    in GSAM's coefficient or in WSAM's decoupled term would be off by
    orders of magnitude."""
    kind, kwargs = MIXED_CASES[case]
    params, x, y = _problem(seed=21, n=12)
    batches = _batches(x, y, epochs=2)
    model, inner = _sam_model(params, _make(kind, keras.optimizers.SGD(LR, momentum=MOMENTUM), rho=RHO, **kwargs),
                              float32_head=True)
    float32_run, _, _ = _train_steps(model, inner, batches)
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model, inner = _sam_model(params, _make(kind, keras.optimizers.SGD(LR, momentum=MOMENTUM), rho=RHO,
                                                **kwargs), float32_head=True)
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        assert inner.get_layer("hidden").compute_dtype == "float16"
        got, logs, _ = _train_steps(model, inner, batches)
        assert float(ops.convert_to_numpy(model.optimizer.dynamic_scale)) == 2.0**15  # no step skipped
    finally:
        keras.config.set_dtype_policy("float32")
    assert all(np.all(np.isfinite(w)) for step in got for w in step)
    assert all(np.isfinite(log[k]) for log in logs for k in DIAGNOSTICS)
    want, records = _reference(kind, params, batches, **kwargs)
    _check_trajectory(float32_run, want, atol=_atol(kind, kwargs))
    _check_trajectory(got, float32_run, rtol=0.0, atol=5e-3, what="mixed vs float32")
    _check_trajectory(got, want, rtol=0.0, atol=5e-3, what="mixed vs reference")
    for key in ("grad_norm", "perturbed_grad_norm"):
        np.testing.assert_allclose([log[key] for log in logs], [r[key] for r in records], rtol=2e-2, err_msg=key)
    assert _max_diff(got[-1], params) > 0.05, "training moved the weights"


# ---------------------------------------------------------------------------
# 7. Bad arguments.
# ---------------------------------------------------------------------------

BAD = [
    ("GSAM", dict(alpha=-0.1), "alpha", -0.1),
    ("GSAM", dict(alpha=1.5), "alpha", 1.5),
    ("GSAM", dict(rho=0.05, rho_min=0.1, lr_max=0.1), "rho_min", 0.1),
    ("GSAM", dict(rho_min=0.01), "lr_max", None),
    ("GSAM", dict(rho_min=0.01, lr_max=0.1, lr_min=0.1), "lr_max", 0.1),
    ("GSAM", dict(rho_min=0.01, lr_max=0.05, lr_min=0.1), "lr_max", 0.05),
    ("GSAM", dict(lr_max=0.1), "lr_max", 0.1),
    ("GSAM", dict(lr_min=0.01), "lr_min", 0.01),
    ("FriendlySAM", dict(sigma=-1), "sigma", -1),
    ("FriendlySAM", dict(lmbda=1.0), "lmbda", 1.0),
    ("FriendlySAM", dict(lmbda=-0.1), "lmbda", -0.1),
    ("WSAM", dict(gamma=1.0), "gamma", 1.0),
    ("WSAM", dict(gamma=-0.1), "gamma", -0.1),
    ("WSAM", dict(decouple="yes"), "decouple", "yes"),
]


@pytest.mark.parametrize("cls_name,kwargs,arg,value", BAD,
                         ids=[f"{c}-{'-'.join(f'{k}={v!r}' for k, v in kw.items())}" for c, kw, _, _ in BAD])
def test_bad_arguments_raise(cls_name, kwargs, arg, value):
    cls = getattr(keras_ssam, cls_name)
    with pytest.raises(ValueError) as info:
        cls(keras.optimizers.SGD(0.1), **kwargs)
    message = str(info.value)
    assert f"`{arg}`" in message, message
    assert f"{arg}={value!r}" in message, message


def test_good_edge_arguments_accepted():
    """The ends of the ranges are valid."""
    base = keras.optimizers.SGD
    for alpha in (0.0, 1.0):
        assert keras_ssam.GSAM(base(0.1), alpha=alpha).alpha == alpha
    opt = keras_ssam.GSAM(base(0.1), rho=0.1, rho_min=0.1, lr_max=0.1)  # rho_min == rho
    assert (opt.rho_min, opt.lr_max) == (0.1, 0.1)
    opt = keras_ssam.GSAM(base(0.1), rho=0.1, rho_min=0.0, lr_max=1e-3, lr_min=0.0)
    assert (opt.rho_min, opt.lr_max, opt.lr_min) == (0.0, 1e-3, 0.0)
    opt = keras_ssam.FriendlySAM(base(0.1), sigma=0.0, lmbda=0.0)
    assert (opt.sigma, opt.lmbda) == (0.0, 0.0)
    opt = keras_ssam.WSAM(base(0.1), gamma=0.0, decouple=False)
    assert (opt.gamma, opt.decouple) == (0.0, False)


# ---------------------------------------------------------------------------
# 8. Config round trips.
# ---------------------------------------------------------------------------

CONFIG_CASES = {
    "GSAM": (keras_ssam.GSAM, dict(rho=0.2, alpha=0.3, stable=True, max_scale=2.0)),
    "GSAM-schedule": (keras_ssam.GSAM, dict(rho=0.2, alpha=0.25, rho_min=0.02, lr_max=0.1, lr_min=0.001)),
    "FriendlySAM": (keras_ssam.FriendlySAM, dict(rho=0.15, sigma=0.5, lmbda=0.8, sam_probability=0.6, seed=11)),
    "WSAM": (keras_ssam.WSAM, dict(rho=0.07, gamma=0.7, decouple=False, epsilon=1e-10)),
    "WSAM-decoupled": (keras_ssam.WSAM, dict(rho=0.07, gamma=0.9, decouple=True, name="my_wsam")),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_round_trip(case):
    cls, kwargs = CONFIG_CASES[case]
    opt = cls(keras.optimizers.SGD(0.05, momentum=0.9), **kwargs)
    config = opt.get_config()
    for key, value in kwargs.items():
        assert config[key] == value, key
    if cls is keras_ssam.GSAM and "rho_min" not in kwargs:
        assert (config["rho_min"], config["lr_max"], config["lr_min"]) == (None, None, 0.0)
    again = cls.from_config(config)
    assert type(again) is cls
    assert again.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(opt))
    assert type(restored) is cls
    assert restored.get_config() == config
    assert restored.base_optimizer.get_config() == opt.base_optimizer.get_config()
    for key, value in kwargs.items():
        if key != "name":
            assert getattr(restored, key) == value, key
