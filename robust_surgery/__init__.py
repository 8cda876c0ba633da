"""robust-surgery: convert pretrained PyTorch networks to NRPM layers, evaluate and reuse them.

Python API (one function per CLI command)::

    import robust_surgery as rs
    model = rs.load_model("zoo:mnist-mlp")            # or a file + arch="torchvision:resnet18"
    nrpm = rs.convert(model, paradigm=1, norm="L1", K=3, lam=0.5)
    rs.save(nrpm, "mlp.nrpm.safetensors")              # surgery convert ... -o
    same = rs.load("mlp.nrpm.safetensors")
"""
__version__ = "0.1.0"

from .evaluate import EvalReport, evaluate
from .finetune import finetune
from .io import ModelLoadError, build_arch, load, load_model, read_manifest, save
from .nn.functional import register_reweight_derivative
from .nn import (
    NRPMConv1d,
    NRPMConv2d,
    NRPMConv3d,
    NRPMLayer,
    NRPMLinear,
    NRPMSettings,
    linear_mode,
    register_reweight,
    straight_through_mode,
    reweight_names,
)
from .report import ConversionReport, conversion_report, inspect_model
from .surgery import (
    PARADIGMS,
    LayerConfig,
    NoLayerMatchedError,
    convert,
    convertible_types,
    nrpm_layers,
    register_converter,
    set_lam,
    unconvert,
)

__all__ = [
    "__version__",
    "convert", "unconvert", "set_lam", "nrpm_layers", "register_converter", "convertible_types",
    "register_reweight", "register_reweight_derivative", "reweight_names", "LayerConfig", "NoLayerMatchedError", "PARADIGMS",
    "NRPMSettings", "NRPMLayer", "NRPMLinear", "NRPMConv1d", "NRPMConv2d", "NRPMConv3d", "linear_mode", "straight_through_mode",
    "load", "load_model", "save", "build_arch", "read_manifest", "ModelLoadError",
    "ConversionReport", "conversion_report", "inspect_model", "evaluate", "EvalReport", "finetune",
]
