"""The SAM family on scikit-learn's digits: SAM, SSAM, GSAM, Friendly SAM and WSAM, plain and stable.

    KERAS_BACKEND=jax python examples/sam_family_digits.py --train-examples 1344 --out docs/results
    KERAS_BACKEND=jax python examples/sam_family_digits.py --quick      # seconds (CI smoke test)

The variants differ in what they do with the two gradients of a SAM step,
the clean `g` and `g_asc` at `w + e`:

  GSAM            keras_ssam.GSAM(alpha=0.4): g_asc minus alpha times g's
                  component orthogonal to g_asc (Zhuang et al., ICLR 2022).
  F-SAM           keras_ssam.FriendlySAM(sigma=1, lmbda=0.9): the ascent
                  along g minus a moving average of past gradients (Li et
                  al., CVPR 2024).
  WSAM            keras_ssam.WSAM(gamma=0.9): g, plus the sharpness term
                  9 (g_asc - g) applied after the base optimizer's update
                  (Yue et al., KDD 2023).
  *-stable        the same with SSAM's unnormalized ascent and
                  renormalization (normalize=False, stable=True): g_asc is
                  rescaled to ||g|| before the variant uses it.

against plain SGD, SAM and SSAM, with the setting of examples/efficient_sam.py
(the quick start's CNN and split, SGD momentum 0.9, 3 seeds, 10 epochs, rho
0.05 for the normalized ascent and 0.5 for the unnormalized one, learning
rates 0.1 and 0.2: at 0.2 SGD fails on digits in the learning-rate sweep and
SSAM does not). Reported per method and learning rate: test accuracy (mean
+- std over seeds, failed runs counted), time per epoch relative to SGD, and
the top Hessian eigenvalue of the training loss at the final weights; the
outputs are sam_family_digits.json and .png under --out.
"""

import keras
from efficient_sam import main  # the comparison's runner, table and plot

import keras_ssam

METHODS = ("SGD", "SAM", "SSAM", "GSAM", "GSAM-stable", "F-SAM", "F-SAM-stable", "WSAM", "WSAM-stable")


def make_optimizer(method, lr, seed, late_start, args):
    base = keras.optimizers.SGD(learning_rate=lr, momentum=0.9)
    stable = method.endswith("-stable")
    name = method.removesuffix("-stable")
    # The stable forms take SSAM's ascent e = rho g and its rho.
    kwargs = {"rho": args.rho_ssam, "normalize": False, "stable": True} if stable else {"rho": args.rho_sam}
    if name == "SGD":
        return base
    if name == "SAM":
        return keras_ssam.SAM(base, **kwargs)
    if name == "SSAM":
        return keras_ssam.SSAM(base, rho=args.rho_ssam)
    if name == "GSAM":
        return keras_ssam.GSAM(base, alpha=0.4, **kwargs)
    if name == "F-SAM":
        return keras_ssam.FriendlySAM(base, sigma=1.0, lmbda=0.9, **kwargs)
    if name == "WSAM":
        return keras_ssam.WSAM(base, gamma=0.9, **kwargs)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


if __name__ == "__main__":
    main(METHODS, make_optimizer, "sam_family_digits", __doc__)
