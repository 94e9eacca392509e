"""skscoreflow: score-based diffusion density estimation with a scikit-learn interface.

The estimator :class:`ScoreFlowDensity` trains a score network by maximum likelihood
(ScoreFlow: Song, Durkan, Murray & Ermon, NeurIPS 2021) and evaluates exact log-densities
through the probability-flow ODE.  The functional core it is built on is public:

* :mod:`skscoreflow.sde` - VE, VP and sub-VP SDEs and the importance-sampling proposal;
* :mod:`skscoreflow.weighting` - the weighted denoising score-matching losses;
* :mod:`skscoreflow.nets` - the residual MLP score network;
* :mod:`skscoreflow.likelihood` - ODE log-likelihood (exact / Hutchinson divergence);
* :mod:`skscoreflow.bound` - the per-sample likelihood bound (Theorem 3);
* :mod:`skscoreflow.sampling` - reverse-SDE and probability-flow ODE samplers;
* :mod:`skscoreflow.training` - the training loop;
* :mod:`skscoreflow.dequantization` - uniform and variational dequantization;
* :mod:`skscoreflow.metrics` - bits/dim conventions;
* :mod:`skscoreflow.datasets` - built-in 2-D densities with known true log-density.
"""

import logging

logging.getLogger("skscoreflow").addHandler(logging.NullHandler())

#: The package version (a PEP 440 string).
#:
#: Examples
#: --------
#: >>> import skscoreflow
#: >>> major, minor = (int(p) for p in skscoreflow.__version__.split(".")[:2])
#: >>> (major, minor) >= (0, 1)
#: True
__version__ = "0.1.0"

from ._estimator import ScoreFlowDensity  # noqa: E402
from .metrics import bits_per_dim  # noqa: E402

__all__ = ["ScoreFlowDensity", "bits_per_dim", "__version__"]
