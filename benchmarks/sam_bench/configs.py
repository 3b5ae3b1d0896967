"""What is benchmarked: backends, models and their sizes, the hyper-parameters,
the configurations (one table, `KERAS_CONFIGS`, plus the peers' two), the
step-time ratios reported with their targets, and the memory target.

To benchmark a new keras_ssam configuration, add one entry to `KERAS_CONFIGS`
(and, if it has a headline comparison, one row to `RATIOS`): the command
line, the children, the tables and the chart pick it up from there.

Nothing here imports Keras: the parent process never picks a backend.
"""

BACKENDS = ("tensorflow", "jax", "torch")
MODELS = ("mlp", "resnet")
NUM_CLASSES = 10
INPUT_SHAPE = (32, 32, 3)

# Model sizes and run lengths: the defaults of a full run and of --smoke.
FULL = {"reps": 5, "steps": 10, "batch_size": 128, "mlp_width": 1024, "mlp_depth": 2,
        "resnet_width": 16, "resnet_stages": 3}
SMOKE = {"reps": 1, "steps": 2, "batch_size": 8, "mlp_width": 32, "mlp_depth": 1,
         "resnet_width": 4, "resnet_stages": 1}
SIZE_KEYS = ("mlp_width", "mlp_depth", "resnet_width", "resnet_stages")

# Every configuration starts from the same weights, with the base optimizer
# SGD(LEARNING_RATE, momentum=MOMENTUM).
LEARNING_RATE = 0.01
MOMENTUM = 0.9
RHO = 0.05
SSAM_ADAPT = {"rho": 0.5, "adaptive": True, "eta": 0.01}
# LookSAM's weight of the reused direction (the paper's and keras_ssam's default),
# and the seed of the sam_probability draws (fixed: every run skips the same steps).
LOOKSAM_ALPHA = 0.7
SAM_PROBABILITY_SEED = 0
# The one-pass variants: Momentum-SAM's radius (the authors' SGD default; its
# useful rho is several times SAM's), random weight perturbation's relative
# noise scale and seed, and m-RWP's weight of the noisy gradient (the authors').
# A LatePhase start no run reaches: a schedule that never runs the perturbed pass.
NEVER_STEP = 10**9
MSAM_RHO = 0.3
RWP_SIGMA = 0.01
RWP_SEED = 0
MRWP_MIX = 0.5
HYPERPARAMETERS = {"sgd_learning_rate": LEARNING_RATE, "sgd_momentum": MOMENTUM, "rho": RHO,
                   "ssam_adapt": SSAM_ADAPT, "looksam_alpha": LOOKSAM_ALPHA,
                   "sam_probability_seed": SAM_PROBABILITY_SEED, "msam_rho": MSAM_RHO,
                   "rwp_sigma": RWP_SIGMA, "rwp_seed": RWP_SEED, "mrwp_mix": MRWP_MIX,
                   "aesam": "AdaptiveSteps(total_steps=the run's steps, delta=0.9, c 1 -> -1)"}


def _without_momentum(base):
    """The base optimizer's twin without momentum (same class and settings)."""
    return base.__class__.from_config({**base.get_config(), "momentum": 0.0})


# The Keras configurations, trained with `fit`, in the order of the tables:
# name -> builder(inner, base, keras_ssam, total_steps) -> (model to compile,
# optimizer), where `inner` is a fresh copy of the Keras model, `base` a fresh
# base optimizer and `total_steps` the steps the process will train the
# configuration for (warm-up included). (keras_ssam is passed in, imported by
# the child that builds.)
KERAS_CONFIGS = {
    # keras.Model.fit with the base optimizer
    "plain": lambda inner, base, ks, n: (inner, base),
    # SAMModel + SAM(SGD, rho=0.05)
    "sam": lambda inner, base, ks, n: (ks.SAMModel(inner), ks.SAM(base, rho=RHO)),
    # SAMModel + SSAM(SGD, rho=0.05)
    "ssam": lambda inner, base, ks, n: (ks.SAMModel(inner), ks.SSAM(base, rho=RHO)),
    # SAMModel + SSAM(SGD, rho=0.5, adaptive=True, eta=0.01)
    "ssam_adapt": lambda inner, base, ks, n: (ks.SAMModel(inner), ks.SSAM(base, **SSAM_ADAPT)),
    # SAMModel(num_batch_splits=2) + SSAM(SGD, rho=0.05)
    "ssam_split2": lambda inner, base, ks, n: (ks.SAMModel(inner, num_batch_splits=2),
                                            ks.SSAM(base, rho=RHO)),
    # SAMModel + LookSAM(SGD, rho=0.05, k=5 or 10, alpha=0.7): the perturbed pass every k steps
    "looksam_k5": lambda inner, base, ks, n: (ks.SAMModel(inner),
                                           ks.LookSAM(base, rho=RHO, k=5, alpha=LOOKSAM_ALPHA)),
    "looksam_k10": lambda inner, base, ks, n: (ks.SAMModel(inner),
                                            ks.LookSAM(base, rho=RHO, k=10, alpha=LOOKSAM_ALPHA)),
    # SAMModel + SAM(SGD, rho=0.05, sam_probability=p, seed=0): the perturbed pass with probability p
    "samp_05": lambda inner, base, ks, n: (ks.SAMModel(inner), ks.SAM(
        base, rho=RHO, sam_probability=0.5, seed=SAM_PROBABILITY_SEED)),
    "samp_02": lambda inner, base, ks, n: (ks.SAMModel(inner), ks.SAM(
        base, rho=RHO, sam_probability=0.2, seed=SAM_PROBABILITY_SEED)),
    # sam_probability=0: every step skips the perturbed pass (the cost of a skipped step)
    "samp_0": lambda inner, base, ks, n: (ks.SAMModel(inner), ks.SAM(
        base, rho=RHO, sam_probability=0.0, seed=SAM_PROBABILITY_SEED)),
    # SAMModel + SAM(SGD, rho=0.05, sam_probability=LatePhase(10**9)): every step
    # skips the perturbed pass too, but the probability is a schedule of the
    # iteration, not a constant: the decision goes through host dispatch (and,
    # in its `_cond` twin, through the step's compiled conditional)
    "samp_late": lambda inner, base, ks, n: (ks.SAMModel(inner), ks.SAM(
        base, rho=RHO, sam_probability=ks.schedules.LatePhase(NEVER_STEP), seed=SAM_PROBABILITY_SEED)),
    # The one-pass variants. SAMModel + MomentumSAM(SGD momentum 0.9, rho=0.3):
    # the perturbation follows the base SGD's own momentum (no state of its own)
    "msam": lambda inner, base, ks, n: (ks.SAMModel(inner), ks.MomentumSAM(base, rho=MSAM_RHO)),
    # keras.Model.fit with SGD without momentum: msam_own's reference
    "plain_nomom": lambda inner, base, ks, n: (inner, _without_momentum(base)),
    # SAMModel + MomentumSAM(SGD without momentum, rho=0.3): keras_ssam keeps its
    # own gradient average (one weight-sized buffer), the base SGD none
    "msam_own": lambda inner, base, ks, n: (ks.SAMModel(inner), ks.MomentumSAM(_without_momentum(base),
                                                                               rho=MSAM_RHO)),
    # SAMModel + RandomSAM(SGD, sigma=0.01): one pass at w + filter-wise noise
    "rwp": lambda inner, base, ks, n: (ks.SAMModel(inner), ks.RandomSAM(base, sigma=RWP_SIGMA, seed=RWP_SEED)),
    # SAMModel + RandomSAM(SGD, sigma=0.01, adaptive=True) (ARWP: one weight-sized buffer F)
    "rwp_adaptive": lambda inner, base, ks, n: (ks.SAMModel(inner), ks.RandomSAM(
        base, sigma=RWP_SIGMA, adaptive=True, seed=RWP_SEED)),
    # SAMModel + RandomSAM(SGD, sigma=0.01, mix=0.5) (m-RWP: the clean and the noisy pass)
    "mrwp": lambda inner, base, ks, n: (ks.SAMModel(inner), ks.RandomSAM(
        base, sigma=RWP_SIGMA, mix=MRWP_MIX, seed=RWP_SEED)),
    # SAMModel(diagnostics=True) + SAM(SGD, rho=0.05,
    # sam_probability=AdaptiveSteps(total_steps)) (AE-SAM: the perturbed pass when
    # ||g||^2 >= mu + c_t sigma). The steps that run the pass depend on the data:
    # the diagnostics log them (MEASURED_SAM_STEPS).
    "aesam": lambda inner, base, ks, n: (ks.SAMModel(inner, diagnostics=True), ks.SAM(
        base, rho=RHO, sam_probability=ks.schedules.AdaptiveSteps(total_steps=n))),
}
# Which iterations run the perturbed pass, for the configurations that skip
# some: name -> fn(iterations as an int NumPy array, keras_ssam) -> bool array.
# Their steps cost one or two passes, so a block's median step is a plain or a
# SAM step depending on which kind is the majority; their ratios are therefore
# taken of the block means (`MIXED_CONFIGS`, see `analysis.ratio`), and the
# report gives the fraction of timed steps that ran the perturbed pass.
SAM_STEP_PATTERNS = {
    "looksam_k5": lambda it, ks: it % 5 == 0,
    "looksam_k10": lambda it, ks: it % 10 == 0,
    "samp_05": lambda it, ks: ks.sam_step_draws(SAM_PROBABILITY_SEED, it) < 0.5,
    "samp_02": lambda it, ks: ks.sam_step_draws(SAM_PROBABILITY_SEED, it) < 0.2,
    "samp_0": lambda it, ks: it < 0,
    "samp_late": lambda it, ks: it >= NEVER_STEP,
}
# Configurations whose perturbed steps depend on the data (AdaptiveSteps) have
# no pattern: their SAMModel logs `sam_step_fraction` (diagnostics=True), and
# the timer reads it at the end of each block (the block's mean, one fit
# call). Their timing includes the diagnostics' few reductions per step.
MEASURED_SAM_STEPS = ("aesam",)
MIXED_CONFIGS = ("looksam_k5", "looksam_k10", "samp_05", "samp_02") + MEASURED_SAM_STEPS


def _conditional(builder):
    """`builder` with host dispatch disabled (sam_bench.conditional)."""

    def build(inner, base, ks, n):
        from .conditional import without_host_dispatch  # imports keras_ssam: children only

        return builder(inner, base, without_host_dispatch(ks), n)

    return build


# Twins: a configuration with one thing changed, appended to the tables.
# `<name>_cond`: host dispatch disabled, so the step decides with the compiled
# conditional that every step held before host dispatch (lax.cond, tf.cond,
# torch's Python `if` on a device scalar; still the path under AdaptiveSteps,
# steps_per_execution > 1 and a LossScaleOptimizer): host dispatch against the
# conditional, side by side in one run.
CONDITIONAL_TWINS = ("looksam_k5", "looksam_k10", "samp_05", "samp_02", "samp_late")
# `<name>_jit`: compiled with jit_compile=True: torch.compile on torch (whose
# default, "auto", is eager), XLA on TensorFlow (whose default is the
# tf.function graph), JAX's default anyway. Not in DEFAULT_CONFIGS: compiling
# takes minutes on a CPU; ask for them with --configs.
JIT_TWINS = ("plain", "sam", "ssam", "looksam_k5", "samp_05", "samp_late", "msam")
for _name in CONDITIONAL_TWINS:
    KERAS_CONFIGS[f"{_name}_cond"] = _conditional(KERAS_CONFIGS[_name])
    SAM_STEP_PATTERNS[f"{_name}_cond"] = SAM_STEP_PATTERNS[_name]
for _name in JIT_TWINS:
    KERAS_CONFIGS[f"{_name}_jit"] = KERAS_CONFIGS[_name]
    if _name in SAM_STEP_PATTERNS:
        SAM_STEP_PATTERNS[f"{_name}_jit"] = SAM_STEP_PATTERNS[_name]
MIXED_CONFIGS += tuple(f"{n}{suffix}" for n in MIXED_CONFIGS for suffix in ("_cond", "_jit")
                       if f"{n}{suffix}" in KERAS_CONFIGS)
# model.compile's options beyond the optimizer and loss, per configuration.
COMPILE_OPTIONS = {f"{n}_jit": {"jit_compile": True} for n in JIT_TWINS}


def compile_options(name):
    """The extra `model.compile` arguments of configuration `name`."""
    return dict(COMPILE_OPTIONS.get(name, {}))

# The same model in a peer library's own training loop (sam_bench.peers):
# plain SGD, and the peer's SAM (rho=RHO).
PEER_CONFIGS = ("peer_plain", "peer_sam")
PEERS = {"jax": "optax.contrib.sam", "torch": "pytorch_optimizer.SAM", "tensorflow": None}
CONFIGS = tuple(KERAS_CONFIGS) + PEER_CONFIGS
# What a run benchmarks when --configs is not given: all but the compiled twins.
DEFAULT_CONFIGS = tuple(c for c in CONFIGS if c not in COMPILE_OPTIONS)



def fraction_target(margin):
    """A target that depends on the measured fraction f of timed steps that
    ran the perturbed pass (MEASURED_SAM_STEPS): the bound 1 + f + margin
    (a SAM step costs about two plain steps, a skipped one about one). f is
    over all timed steps and changes from block to block (AdaptiveSteps'
    threshold moves during the run), so the ratio held against it is the
    one over all timed steps too: the pooled mean step over plain's
    (`statistic`), not the median of the per-repetition ratios."""

    def bound(ratio):
        return 1.0 + ratio["sam_step_fraction"] + margin

    bound.rule = f"1 + f + {margin:.2f}, against the pooled mean ratio"
    bound.statistic = "pooled_mean_ratio"
    return bound


def target_bound(target, ratio):
    """The upper bound of a RATIOS target for this ratio entry (a number, or
    `fraction_target`'s rule applied to its measured fraction; None when the
    fraction is unknown)."""
    if callable(target):
        return target(ratio) if "sam_step_fraction" in ratio else None
    return target


_ALL = ("tensorflow", "jax", "torch")
# The step-time ratios reported, in this order:
# (numerator, denominator, label, {backend: target upper bound, a number or a
# `fraction_target`})
RATIOS = (
    ("sam", "plain", "SAM/plain", {"tensorflow": 2.10, "jax": 2.10, "torch": 2.25}),
    ("ssam", "sam", "SSAM/SAM", {"tensorflow": 1.03, "jax": 1.03, "torch": 1.03}),
    ("ssam_adapt", "sam", "adaptive SSAM/SAM", {}),
    ("ssam_split2", "ssam", "SSAM split2/SSAM", {}),
    ("peer_sam", "peer_plain", "peer SAM/plain", {}),
    # The cheap variants against plain (block means: MIXED_CONFIGS). A LookSAM
    # step costs (k + 1)/k plain steps plus the reuse arithmetic; a skipped
    # step one clean pass plus the conditional.
    ("looksam_k5", "plain", "LookSAM k5/plain", {"tensorflow": 1.35, "jax": 1.35, "torch": 1.35}),
    ("looksam_k10", "plain", "LookSAM k10/plain", {"tensorflow": 1.25, "jax": 1.25, "torch": 1.25}),
    ("samp_05", "plain", "SAM p=0.5/plain", {"tensorflow": 1.6, "jax": 1.6, "torch": 1.6}),
    ("samp_02", "plain", "SAM p=0.2/plain", {}),
    # A step that skips the perturbed pass: one clean pass, plus, with host
    # dispatch, a Python call on the host, or the compiled conditional.
    ("samp_0", "plain", "skipped step/plain", dict.fromkeys(_ALL, 1.05)),
    ("samp_late", "plain", "skipped step sched/plain", dict.fromkeys(_ALL, 1.05)),
    # The same with host dispatch disabled (the `_cond` twins: the compiled
    # conditional), same targets, and each host-dispatched configuration over
    # its twin (paired per repetition).
    ("samp_late_cond", "plain", "skipped step sched cond/plain", dict.fromkeys(_ALL, 1.05)),
    ("looksam_k5_cond", "plain", "LookSAM k5 cond/plain", dict.fromkeys(_ALL, 1.35)),
    ("looksam_k10_cond", "plain", "LookSAM k10 cond/plain", dict.fromkeys(_ALL, 1.25)),
    ("samp_05_cond", "plain", "SAM p=0.5 cond/plain", dict.fromkeys(_ALL, 1.6)),
    ("samp_02_cond", "plain", "SAM p=0.2 cond/plain", {}),
    ("samp_late", "samp_late_cond", "skipped step sched host/cond", {}),
    ("looksam_k5", "looksam_k5_cond", "LookSAM k5 host/cond", {}),
    ("looksam_k10", "looksam_k10_cond", "LookSAM k10 host/cond", {}),
    ("samp_05", "samp_05_cond", "SAM p=0.5 host/cond", {}),
    ("samp_02", "samp_02_cond", "SAM p=0.2 host/cond", {}),
    # The one-pass variants against plain: one forward-backward pass plus the
    # perturbation arithmetic (a few passes over the weights).
    ("msam", "plain", "MomentumSAM/plain", dict.fromkeys(_ALL, 1.10)),
    ("msam_own", "plain_nomom", "MSAM own avg/plain no-mom", dict.fromkeys(_ALL, 1.10)),
    ("rwp", "plain", "RandomSAM/plain", dict.fromkeys(_ALL, 1.10)),
    ("rwp_adaptive", "plain", "ARWP/plain", dict.fromkeys(_ALL, 1.10)),
    # m-RWP runs two passes: SAM/plain's targets.
    ("mrwp", "plain", "m-RWP/plain", {"tensorflow": 2.10, "jax": 2.10, "torch": 2.25}),
    # Adaptive steps: a fraction f of the steps run the perturbed pass, known
    # only after the run (block means, MEASURED_SAM_STEPS).
    ("aesam", "plain", "AE-SAM/plain", dict.fromkeys(_ALL, fraction_target(0.10))),
    # The compiled twins (jit_compile=True: torch.compile on torch) against
    # each other, with the eager targets, and against the default compilation.
    ("sam_jit", "plain_jit", "SAM/plain jit", {"tensorflow": 2.10, "jax": 2.10, "torch": 2.25}),
    ("ssam_jit", "sam_jit", "SSAM/SAM jit", dict.fromkeys(_ALL, 1.03)),
    ("looksam_k5_jit", "plain_jit", "LookSAM k5/plain jit", dict.fromkeys(_ALL, 1.35)),
    ("samp_05_jit", "plain_jit", "SAM p=0.5/plain jit", dict.fromkeys(_ALL, 1.6)),
    ("samp_late_jit", "plain_jit", "skipped step sched/plain jit", dict.fromkeys(_ALL, 1.05)),
    ("msam_jit", "plain_jit", "MomentumSAM/plain jit", dict.fromkeys(_ALL, 1.10)),
    ("plain_jit", "plain", "plain jit/default", {}),
    ("sam_jit", "sam", "SAM jit/default", {}),
    ("ssam_jit", "ssam", "SSAM jit/default", {}),
    ("looksam_k5_jit", "looksam_k5", "LookSAM k5 jit/default", {}),
    ("msam_jit", "msam", "MomentumSAM jit/default", {}),
)
PEER_LEGEND = "peer SAM/plain (JAX: optax, torch: pytorch_optimizer)"

# SAM step peak - plain step peak <= ~2x the trainable weights' bytes.
MEMORY_TARGET_WEIGHTS = 2.0
# The one-pass variants' memory against their reference, in trainable-weight
# sizes: (numerator, denominator, label, max extra of the step's transient
# memory, max extra persistent optimizer state). The step needs w + e (one
# weight-sized buffer); the state is none where the base optimizer's own
# momentum gives the direction (msam) or the noise is drawn from (seed,
# iteration) (rwp), one buffer where keras_ssam keeps its own average
# (msam_own) or ARWP's F (rwp_adaptive). The state is counted exactly (the
# bytes of optimizer.variables; scalars below STATE_TOLERANCE_WEIGHTS), the
# transient memory from the RSS step peak and, on JAX, XLA's analysis.
MEMORY_COMPARISONS = (
    ("msam", "plain", "MomentumSAM", 1.0, 0.0),
    ("msam_own", "plain_nomom", "MSAM own avg", 1.0, 1.0),
    ("rwp", "plain", "RandomSAM", 1.0, 0.0),
    ("rwp_adaptive", "plain", "ARWP", 1.0, 1.0),
)
STATE_TOLERANCE_WEIGHTS = 0.01
# RSS is page-granular with MiB-scale allocator noise: its SAM-extra verdict is
# only given for models whose weights are at least this large.
RSS_VERDICT_MIN_WEIGHT_MIB = 4.0
