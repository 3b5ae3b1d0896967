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
HYPERPARAMETERS = {"sgd_learning_rate": LEARNING_RATE, "sgd_momentum": MOMENTUM, "rho": RHO,
                   "ssam_adapt": SSAM_ADAPT}

# The Keras configurations, trained with `fit`, in the order of the tables:
# name -> builder(inner, base, keras_ssam) -> (model to compile, optimizer),
# where `inner` is a fresh copy of the Keras model and `base` a fresh base
# optimizer. (keras_ssam is passed in, imported by the child that builds.)
KERAS_CONFIGS = {
    # keras.Model.fit with the base optimizer
    "plain": lambda inner, base, ks: (inner, base),
    # SAMModel + SAM(SGD, rho=0.05)
    "sam": lambda inner, base, ks: (ks.SAMModel(inner), ks.SAM(base, rho=RHO)),
    # SAMModel + SSAM(SGD, rho=0.05)
    "ssam": lambda inner, base, ks: (ks.SAMModel(inner), ks.SSAM(base, rho=RHO)),
    # SAMModel + SSAM(SGD, rho=0.5, adaptive=True, eta=0.01)
    "ssam_adapt": lambda inner, base, ks: (ks.SAMModel(inner), ks.SSAM(base, **SSAM_ADAPT)),
    # SAMModel(num_batch_splits=2) + SSAM(SGD, rho=0.05)
    "ssam_split2": lambda inner, base, ks: (ks.SAMModel(inner, num_batch_splits=2),
                                            ks.SSAM(base, rho=RHO)),
}
# The same model in a peer library's own training loop (sam_bench.peers):
# plain SGD, and the peer's SAM (rho=RHO).
PEER_CONFIGS = ("peer_plain", "peer_sam")
PEERS = {"jax": "optax.contrib.sam", "torch": "pytorch_optimizer.SAM", "tensorflow": None}
CONFIGS = tuple(KERAS_CONFIGS) + PEER_CONFIGS

# The step-time ratios reported, in this order:
# (numerator, denominator, label, {backend: target upper bound})
RATIOS = (
    ("sam", "plain", "SAM/plain", {"tensorflow": 2.10, "jax": 2.10, "torch": 2.25}),
    ("ssam", "sam", "SSAM/SAM", {"tensorflow": 1.03, "jax": 1.03, "torch": 1.03}),
    ("ssam_adapt", "sam", "adaptive SSAM/SAM", {}),
    ("ssam_split2", "ssam", "SSAM split2/SSAM", {}),
    ("peer_sam", "peer_plain", "peer SAM/plain", {}),
)
PEER_LEGEND = "peer SAM/plain (JAX: optax, torch: pytorch_optimizer)"

# SAM step peak - plain step peak <= ~2x the trainable weights' bytes.
MEMORY_TARGET_WEIGHTS = 2.0
# RSS is page-granular with MiB-scale allocator noise: its SAM-extra verdict is
# only given for models whose weights are at least this large.
RSS_VERDICT_MIN_WEIGHT_MIB = 4.0
