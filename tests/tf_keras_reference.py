"""A float64 NumPy reference of tf.keras's `SharpnessAwareMinimization` step.

Written by hand from the behaviour of tf-keras's
`tf_keras/models/sharpness_aware_minimization.py` (Keras 2); no Keras, no
autodiff and no keras_ssam code. One training step on a batch `(x, y, sw)`:

    split the batch into `num_batch_splits` equal chunks (tf.split: a batch
    it does not divide is an error), or keep it whole (None)
    for each chunk, in order:
        g   = gradient of the compiled loss at w, INFERENCE mode
              (BatchNormalization normalizes with its moving statistics)
        e   = rho * g / (||g|| + 1e-12)            (one global L2 norm)
        g_i = gradient of the compiled loss at w + e, TRAINING mode
              (BatchNormalization normalizes with the chunk's statistics and
              updates its moving statistics with them: the next chunk's
              inference pass sees the updated ones)
    update = sum_i g_i; the base optimizer applies it at w
    logged `loss` = mean of the compiled loss of all 2 * chunks passes,
                    weighted by chunk size (tf.keras's loss tracker is
                    updated by every `compiled_loss` call)
    metrics       = from the inference-mode predictions at w, concatenated

The compiled loss has no regularization term (tf.keras called
`compiled_loss` without `regularization_losses`).

Switches model keras_ssam's documented departures (`tf_keras_default()`
gives the tf.keras step): `ascent_training` (the first pass in training
mode), `batch_split_reduction="mean"` (the chunks' gradients weighted by
chunk size / batch), `include_regularization` (the L2 term in every pass),
`bn_statistics="whole_batch"` (every chunk's passes use the statistics from
before the step, which are updated once from the whole batch at w in
training mode), `uneven_splits` (np.array_split: chunk sizes differ by at
most one).

The network: `x -> [BatchNormalization] -> Dense(hidden, tanh) ->
[ModeScale(s): times s in training mode, identity in inference] ->
Dense(out)`, Keras's "mse" loss (per-example mean over outputs, times the
sample weight, summed and divided by the batch size) and an optional
`l2 * sum(W1^2)` kernel regularizer on the first Dense layer.
"""

import dataclasses

import numpy as np

BN_EPSILON = 1e-3  # keras.layers.BatchNormalization's defaults
BN_MOMENTUM = 0.99


def global_norm(arrays):
    return float(np.sqrt(sum(np.sum(np.square(a)) for a in arrays)))


@dataclasses.dataclass(frozen=True)
class Net:
    """The network above; `params` in the order of the Keras model's
    `trainable_variables`: `[gamma, beta]` (with batch_norm) then
    `[W1, b1, W2, b2]`; `state` is `[moving_mean, moving_variance]` (with
    batch_norm) or `[]`."""

    batch_norm: bool = False
    mode_scale: float | None = None
    l2: float = 0.0

    def init(self, rng, n_in=3, n_hidden=5, n_out=2, scale=0.6):
        """Random parameters rounded to float32 (held in float64), and the
        BatchNormalization state Keras starts from."""
        shapes = [(n_in, n_hidden), (n_hidden,), (n_hidden, n_out), (n_out,)]
        params = [scale * rng.standard_normal(s) for s in shapes]
        state = []
        if self.batch_norm:
            params = [1.0 + 0.2 * rng.standard_normal(n_in), 0.2 * rng.standard_normal(n_in)] + params
            state = [np.zeros(n_in), np.ones(n_in)]
        return [p.astype(np.float32).astype(np.float64) for p in params], state

    def pass_(self, params, state, x, t, sw, training):
        """One forward and backward pass.

        Returns `(compiled_loss, reg_loss, grads_compiled, grads_reg, pred,
        batch_moments)`; `batch_moments` is the batch's `(mean, variance)` at
        the BatchNormalization layer in training mode, else None.
        """
        moments = None
        if self.batch_norm:
            gamma, beta, w1, b1, w2, b2 = params
            if training:
                mean, var = x.mean(axis=0), x.var(axis=0)  # biased, as ops.moments
                moments = (mean, var)
            else:
                mean, var = state
            xhat = (x - mean) / np.sqrt(var + BN_EPSILON)
            a0 = gamma * xhat + beta
        else:
            w1, b1, w2, b2 = params
            a0 = x
        h = np.tanh(a0 @ w1 + b1)
        s = self.mode_scale if (training and self.mode_scale is not None) else 1.0
        hs = s * h
        pred = hs @ w2 + b2
        n = x.shape[0]
        sw = np.ones(n) if sw is None else sw
        r = pred - t
        per_example = np.mean(r**2, axis=1)
        loss = float(np.sum(sw * per_example) / n)
        dpred = 2.0 * r * sw[:, None] / (n * t.shape[1])
        dw2 = hs.T @ dpred
        db2 = dpred.sum(axis=0)
        dz = (dpred @ w2.T) * s * (1.0 - h**2)
        dw1 = a0.T @ dz
        db1 = dz.sum(axis=0)
        grads = [dw1, db1, dw2, db2]
        reg_grads = [2.0 * self.l2 * w1, np.zeros_like(b1), np.zeros_like(w2), np.zeros_like(b2)]
        if self.batch_norm:
            da0 = dz @ w1.T
            # x is data: only gamma and beta get gradients (batch statistics
            # of the input do not depend on any weight).
            grads = [np.sum(da0 * xhat, axis=0), np.sum(da0, axis=0)] + grads
            reg_grads = [np.zeros_like(gamma), np.zeros_like(beta)] + reg_grads
        reg = float(self.l2 * np.sum(w1**2))
        return loss, reg, grads, reg_grads, pred, moments


def update_bn_state(state, moments):
    mean, var = moments
    return [
        state[0] * BN_MOMENTUM + mean * (1.0 - BN_MOMENTUM),
        state[1] * BN_MOMENTUM + var * (1.0 - BN_MOMENTUM),
    ]


class SGD:
    """Keras `SGD(lr, momentum)`, nesterov=False:
    `v <- momentum v - lr g; w <- w + v` (momentum 0: `w <- w - lr g`)."""

    def __init__(self, lr, momentum=0.0):
        self.lr, self.momentum, self.v = lr, momentum, None

    def apply(self, params, grads):
        if self.momentum == 0:
            return [p - self.lr * g for p, g in zip(params, grads)]
        if self.v is None:
            self.v = [np.zeros_like(p) for p in params]
        self.v = [self.momentum * v - self.lr * g for v, g in zip(self.v, grads)]
        return [p + v for p, v in zip(params, self.v)]


class Adam:
    """Keras `Adam(lr, beta_1, beta_2, epsilon=1e-7)` (amsgrad=False), step
    count `t` from 1:

        m <- m + (g - m)(1 - beta_1);  v <- v + (g^2 - v)(1 - beta_2)
        w <- w - lr sqrt(1 - beta_2^t) / (1 - beta_1^t) m / (sqrt(v) + epsilon)
    """

    def __init__(self, lr, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        self.lr, self.b1, self.b2, self.eps = lr, beta_1, beta_2, epsilon
        self.m = self.v = None
        self.t = 0

    def apply(self, params, grads):
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
            self.v = [np.zeros_like(p) for p in params]
        self.t += 1
        alpha = self.lr * np.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        self.m = [m + (g - m) * (1 - self.b1) for m, g in zip(self.m, grads)]
        self.v = [v + (g * g - v) * (1 - self.b2) for v, g in zip(self.v, grads)]
        return [p - alpha * m / (np.sqrt(v) + self.eps) for p, m, v in zip(params, self.m, self.v)]


class SharpnessAwareMinimization:
    """tf.keras's SAM training step on `net`, one `step(x, y, sw)` at a time.

    `params`, `state` hold the current weights and BatchNormalization
    statistics; `optimizer` is `SGD` or `Adam` above. The keyword switches
    are described in the module docstring; their defaults are tf.keras's.
    """

    def __init__(self, net, params, state, optimizer, rho=0.05, num_batch_splits=None, *,
                 ascent_training=False, batch_split_reduction="sum", include_regularization=False,
                 bn_statistics="tf_keras", uneven_splits=False):
        assert batch_split_reduction in ("sum", "mean")
        assert bn_statistics in ("tf_keras", "whole_batch")
        self.net, self.params, self.state = net, [p.copy() for p in params], [s.copy() for s in state]
        self.optimizer, self.rho, self.splits = optimizer, rho, num_batch_splits
        self.ascent_training = ascent_training
        self.reduction = batch_split_reduction
        self.include_regularization = include_regularization
        self.bn_statistics = bn_statistics
        self.uneven_splits = uneven_splits

    def _grads(self, params, state, x, t, sw, training):
        loss, reg, grads, reg_grads, pred, moments = self.net.pass_(params, state, x, t, sw, training)
        if self.include_regularization:
            loss += reg
            grads = [g + rg for g, rg in zip(grads, reg_grads)]
        return loss, grads, pred, moments

    def _chunks(self, n):
        if self.splits is None:
            return [np.arange(n)]
        if n % self.splits and not self.uneven_splits:
            raise ValueError(f"tf.split: {self.splits} does not divide the batch size {n}")
        return [c for c in np.array_split(np.arange(n), self.splits) if len(c)]

    def step(self, x, t, sw=None):
        """One training step. Returns a dict: `update` (the gradient the
        optimizer applied), `tf_keras_loss` (tf.keras's logged loss),
        `tf_keras_pred` (what its metrics saw), `clean_loss` and
        `clean_pred` (the training-mode pass over the whole batch at w, from
        the state before the step: keras_ssam's logged loss and metrics
        inputs), `grad_norms` (||g|| per chunk)."""
        n = x.shape[0]
        pre_state = [s.copy() for s in self.state]
        clean_loss, _, clean_pred, clean_moments = self._grads(self.params, pre_state, x, t, sw, True)
        update = [np.zeros_like(p) for p in self.params]
        logged, preds, norms = [], [], []
        for idx in self._chunks(n):
            xb, tb, swb = x[idx], t[idx], None if sw is None else sw[idx]
            state = self.state if self.bn_statistics == "tf_keras" else pre_state
            loss1, g, pred1, _ = self._grads(self.params, state, xb, tb, swb, self.ascent_training)
            norm = global_norm(g)
            norms.append(norm)
            scale = self.rho / (norm + 1e-12)
            perturbed = [p + scale * gi for p, gi in zip(self.params, g)]
            loss2, g2, _, moments = self._grads(perturbed, state, xb, tb, swb, True)
            if self.bn_statistics == "tf_keras" and moments is not None:
                self.state = update_bn_state(self.state, moments)
            weight = 1.0 if self.reduction == "sum" else len(idx) / n
            update = [u + weight * gi for u, gi in zip(update, g2)]
            logged += [(loss1, len(idx)), (loss2, len(idx))]
            preds.append(pred1)
        if self.bn_statistics == "whole_batch" and clean_moments is not None:
            self.state = update_bn_state(pre_state, clean_moments)
        self.params = self.optimizer.apply(self.params, update)
        tf_keras_loss = sum(v * k for v, k in logged) / sum(k for _, k in logged)
        return dict(
            update=update,
            tf_keras_loss=tf_keras_loss,
            tf_keras_pred=np.concatenate(preds, axis=0),
            clean_loss=clean_loss,
            clean_pred=clean_pred,
            grad_norms=norms,
        )
