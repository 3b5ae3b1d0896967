"""The `_cond` configurations (`configs.CONDITIONAL_TWINS`): a keras_ssam
configuration with host dispatch disabled, so that its step keeps the
compiled conditional that chose between the passes on every step before host
dispatch (`lax.cond` on JAX, `tf.cond` on TensorFlow, a Python `if` on a
device scalar on torch), and that still runs under `AdaptiveSteps`,
`steps_per_execution > 1` and a `LossScaleOptimizer`.

The library is not changed: the builder makes its model a
`ConditionalSAMModel`, a `SAMModel` subclass that adds nothing, and, in this
process only, `keras_ssam.host_dispatch.applies` (which `SAMModel` asks
before compiling the two dispatched steps) answers False for that class and
what it answered before for every other model. keras_ssam versions without
host dispatch (no `keras_ssam.host_dispatch`) have only the conditional: there
the twin is the configuration itself.

Imported by the children only (it imports keras_ssam, hence Keras).
"""

_STATE = {}


def without_host_dispatch(ks):
    """keras_ssam as the builders see it, with `SAMModel` replaced by
    `ConditionalSAMModel` (everything else forwarded)."""
    return _Forward(ks, conditional_model_class(ks))


def conditional_model_class(ks):
    """`ConditionalSAMModel`, patching `host_dispatch.applies` once."""
    if "class" not in _STATE:
        try:
            from keras_ssam import host_dispatch
        except ImportError:  # before host dispatch: the conditional is the only path
            _STATE["class"] = ks.SAMModel
            return ks.SAMModel

        class ConditionalSAMModel(ks.SAMModel):
            """A SAMModel whose steps keep the compiled conditional."""

        original = host_dispatch.applies

        def applies(model, sam):
            return False if isinstance(model, ConditionalSAMModel) else original(model, sam)

        host_dispatch.applies = applies
        _STATE["class"] = ConditionalSAMModel
    return _STATE["class"]


def step_decision(model):
    """How a compiled model decides whether a step runs the perturbed pass:
    "host" (two compiled steps, host dispatch), "conditional" (a compiled
    conditional in the step), "static" (known when tracing: every step or
    none), "-" (no SAM optimizer), "in step" (a keras_ssam without the
    methods to tell conditional from static). Read after the first fit."""
    import keras_ssam

    try:
        from keras_ssam import host_dispatch
    except ImportError:
        host_dispatch = None
    if host_dispatch is not None and isinstance(getattr(model, "train_function", None), host_dispatch.HostDispatch):
        return "host"
    sam_of = getattr(model, "sam_optimizer", None)
    if not callable(sam_of):
        return "-" if not isinstance(model, keras_ssam.SAMModel) else "in step"
    sam = sam_of()
    try:
        if sam.decision_needs_gradient():
            return "conditional"
        p = sam.sam_probability
        never = isinstance(p, (int, float)) and p <= 0
        return "static" if sam.always_runs_perturbed_pass() or never else "conditional"
    except AttributeError:
        return "in step"


class _Forward:
    def __init__(self, ks, model_class):
        self._ks = ks
        self.SAMModel = model_class

    def __getattr__(self, name):
        return getattr(self._ks, name)
