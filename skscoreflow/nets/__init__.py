"""Score networks: :class:`ScoreMLP` for tabular rows, :class:`ScoreUNet` for images.

Both predict the noise ``eps_hat(x_t, t)`` and return the score ``s(x, t) = -eps_hat / sigma(t)``
(the noise-prediction parameterisation of Score-SDE and ScoreFlow), so the likelihood-weighted
loss with importance sampling is the plain noise MSE.  Both take flat rows ``(n, d)``; the U-Net
reshapes them to ``image_shape`` inside.  :func:`network_from_config` rebuilds either from its
``config()`` (what persistence stores).

Examples
--------
>>> import torch
>>> mlp = ScoreMLP(4, "vp", hidden_layer_sizes=(32,))
>>> unet = ScoreUNet((1, 2, 2), "vp", channels=8, channel_mult=(1,))
>>> x, t = torch.zeros(3, 4), torch.full((3,), 0.5)
>>> mlp(x, t).shape == unet(x, t).shape == (3, 4)   # flat rows in, flat scores out
True
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..sde import SDE
from .mlp import ScoreMLP, _FourierFeatures, _NoiseLevelEmbedding
from .unet import UNET_PRESETS as _PRESETS
from .unet import ScoreUNet, unet_defaults

__all__ = ["ScoreMLP", "ScoreUNet", "UNET_PRESETS", "network_from_config", "unet_defaults"]

# Pickles, reprs and the docs name the public path, whatever file a class lives in.
for _cls in (ScoreMLP, ScoreUNet):
    _cls.__module__ = __name__
del _cls

_PRIVATE = (_FourierFeatures, _NoiseLevelEmbedding)  # re-exported for the tests

#: Named U-Net sizes for :meth:`ScoreUNet.from_preset` and the estimator's ``network``.
#: ``"ddpmpp_cifar10"`` is the DDPM++ (cont.) network of Score-SDE and ScoreFlow for CIFAR-10
#: (61,804,419 parameters at ``image_shape=(3, 32, 32)``); ``"ddpmpp_deep_cifar10"`` its deep
#: variant (106,632,579).
#:
#: Examples
#: --------
#: >>> sorted(UNET_PRESETS)
#: ['ddpmpp_cifar10', 'ddpmpp_deep_cifar10']
#: >>> UNET_PRESETS["ddpmpp_cifar10"]["num_res_blocks"]
#: 4
UNET_PRESETS = _PRESETS


def network_from_config(config: dict[str, Any], sde: SDE | None = None) -> nn.Module:
    """Rebuild an untrained score network of either kind from its ``config()``.

    Parameters
    ----------
    config : dict
        ``ScoreMLP.config()`` or ``ScoreUNet.config()`` output (the U-Net's has
        ``"network": "unet"``; a config without the key is an MLP's).
    sde : SDE, optional
        The SDE to use instead of rebuilding the one named in ``config``.

    Returns
    -------
    torch.nn.Module
        A :class:`ScoreMLP` or :class:`ScoreUNet` with freshly initialised weights.

    Examples
    --------
    >>> net = ScoreUNet((1, 8, 8), channels=8)
    >>> type(network_from_config(net.config())).__name__
    'ScoreUNet'
    """
    cls = ScoreUNet if config.get("network", "mlp") == "unet" else ScoreMLP
    return cls.from_config(config, sde=sde)
