"""NRPM layers and their math."""
from robust_surgery.nn.functional import NRPMSettings, nrpm_conv, nrpm_linear, register_reweight, reweight_names
from robust_surgery.nn.layers import NRPMConv1d, NRPMConv2d, NRPMConv3d, NRPMLayer, NRPMLinear, lam_to_logit, linear_mode, straight_through_mode

__all__ = [
    "NRPMSettings", "nrpm_linear", "nrpm_conv", "register_reweight", "reweight_names",
    "NRPMLayer", "NRPMLinear", "NRPMConv1d", "NRPMConv2d", "NRPMConv3d", "lam_to_logit", "linear_mode",
    "straight_through_mode",
]
