"""The peers: the same model trained by another library's SAM in that
library's own loop, next to a plain-SGD loop in the same style (configs
`peer_plain` and `peer_sam`). Each has the interface of `KerasConfig`
(`name`, `kind`, `traces`, `run_block(steps)` -> per-step seconds).

JAX: an `optax.contrib.sam` loop (opaque mode, sync_period=2: one call to
`update` does the ascent and the descent, the loop documented in optax's
source), jitted with donated state, against a plain `optax.sgd` loop; both
call the Keras model as a pure function (`stateless_call`), so the network is
literally the same. The jitted step counts its traces like the Keras
configurations.

torch: a `pytorch_optimizer.SAM` loop (first_step / second_step, BatchNorm
running statistics frozen on the second pass as that library's utilities do)
against a plain `torch.optim.SGD` loop, on the same architecture written in
`torch.nn` (`models.build_torch_model`).

TensorFlow has no peer. Peer steps are timed from before converting the numpy
batch to after reading the loss back as a Python float.
"""

import time

from .configs import LEARNING_RATE, MOMENTUM, RHO
from .memory import xla_stats
from .models import build_torch_model


class JaxPeerConfig:
    """optax loop on the Keras model used as a pure function (stateless_call)."""

    kind = "peer"

    def __init__(self, name, template, x, y, batch_size):
        import jax
        import jax.numpy as jnp
        import keras
        import optax
        import optax.contrib

        self.name = name
        self.x, self.y, self.batch_size = x, y, batch_size
        model = keras.models.clone_model(template)
        model.set_weights(template.get_weights())
        self.model = model
        self.trainable = [jnp.array(v.value) for v in model.trainable_variables]
        self.non_trainable = [jnp.array(v.value) for v in model.non_trainable_variables]
        self.traces = 0

        def loss_fn(trainable, non_trainable, xb, yb):
            logits, new_non_trainable = model.stateless_call(
                trainable, non_trainable, xb, training=True
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
            return loss, new_non_trainable

        if name == "peer_plain":
            opt = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)

            def step(trainable, non_trainable, opt_state, xb, yb):
                self.traces += 1
                (loss, new_nt), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                    trainable, non_trainable, xb, yb
                )
                updates, opt_state = opt.update(grads, opt_state, trainable)
                return optax.apply_updates(trainable, updates), new_nt, opt_state, loss

        elif name == "peer_sam":
            # The drop-in SAM of optax's docs: normalized-gradient SGD(rho) as
            # the adversarial optimizer; opaque mode runs the ascent and the
            # descent inside one `update` call, given `grad_fn`.
            opt = optax.contrib.sam(
                optax.sgd(LEARNING_RATE, momentum=MOMENTUM),
                optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
                sync_period=2,
                opaque_mode=True,
            )

            def step(trainable, non_trainable, opt_state, xb, yb):
                self.traces += 1
                (loss, new_nt), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                    trainable, non_trainable, xb, yb
                )
                # The adversarial pass reads the pre-step BatchNorm statistics
                # and its state updates are dropped.
                grad_fn = jax.grad(lambda p, _: loss_fn(p, non_trainable, xb, yb)[0])
                updates, opt_state = opt.update(grads, opt_state, trainable, grad_fn=grad_fn)
                return optax.apply_updates(trainable, updates), new_nt, opt_state, loss

        else:
            raise ValueError(f"unknown JAX peer config {name!r}")
        self.opt_state = opt.init(self.trainable)
        self.step = jax.jit(step, donate_argnums=(0, 1, 2))

    def run_block(self, steps):
        import jax.numpy as jnp

        times, b = [], self.batch_size
        for i in range(steps):
            t0 = time.perf_counter()
            xb, yb = jnp.asarray(self.x[i * b:(i + 1) * b]), jnp.asarray(self.y[i * b:(i + 1) * b])
            self.trainable, self.non_trainable, self.opt_state, loss = self.step(
                self.trainable, self.non_trainable, self.opt_state, xb, yb
            )
            float(loss)
            times.append(time.perf_counter() - t0)
        return times

    def jit_cache_size(self):
        try:
            return int(self.step._cache_size())
        except Exception:  # noqa: BLE001 - private API, best effort
            return None

    def xla_memory(self):
        b = self.batch_size
        return xla_stats(
            self.step.lower(
                self.trainable, self.non_trainable, self.opt_state, self.x[:b], self.y[:b]
            ).compile()
        )


class TorchPeerConfig:
    """Plain PyTorch loop on the torch.nn twin of the model."""

    kind = "peer"

    def __init__(self, name, model_name, sizes, x, y, batch_size):
        import torch

        self.name = name
        self.x = x.transpose(0, 3, 1, 2).copy()  # NCHW, torch's native layout
        self.y = y.astype("int64")
        self.batch_size = batch_size
        torch.manual_seed(0)
        self.model = build_torch_model(model_name, sizes)
        self.model.train()
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.traces = None
        if name == "peer_plain":
            self.opt = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
        elif name == "peer_sam":
            import pytorch_optimizer

            self.opt = pytorch_optimizer.SAM(
                self.model.parameters(), torch.optim.SGD, rho=RHO, lr=LEARNING_RATE, momentum=MOMENTUM
            )
        else:
            raise ValueError(f"unknown torch peer config {name!r}")

    def _set_running_stats(self, enabled):
        # What pytorch_optimizer's enable/disable_running_stats do: BatchNorm
        # statistics are updated by the first pass only.
        from torch.nn.modules.batchnorm import _BatchNorm

        for module in self.model.modules():
            if isinstance(module, _BatchNorm):
                if enabled:
                    if hasattr(module, "backup_momentum"):
                        module.momentum = module.backup_momentum
                else:
                    module.backup_momentum = module.momentum
                    module.momentum = 0

    def _one_step(self, xb, yb):
        model, opt, loss_fn = self.model, self.opt, self.loss_fn
        if self.name == "peer_plain":
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            return loss
        self._set_running_stats(True)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.first_step(zero_grad=True)
        self._set_running_stats(False)
        loss_fn(model(xb), yb).backward()
        opt.second_step(zero_grad=True)
        return loss

    def run_block(self, steps):
        import torch

        times, b = [], self.batch_size
        for i in range(steps):
            t0 = time.perf_counter()
            xb = torch.from_numpy(self.x[i * b:(i + 1) * b])
            yb = torch.from_numpy(self.y[i * b:(i + 1) * b])
            loss = self._one_step(xb, yb)
            loss.item()
            times.append(time.perf_counter() - t0)
        return times


def peer_available(backend):
    try:
        if backend == "jax":
            import optax.contrib  # noqa: F401

            return True, None
        if backend == "torch":
            import pytorch_optimizer  # noqa: F401

            return True, None
    except ImportError as e:
        return False, f"{e}"
    return False, "no peer SAM implementation for this backend"
