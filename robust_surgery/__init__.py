"""robust-surgery: convert pretrained PyTorch networks to NRPM layers, evaluate and reuse them.

Python API (one function per CLI command)::

    import robust_surgery as rs
    model = rs.load_model("zoo:mnist-mlp")            # or a file + arch="torchvision:resnet18"
    nrpm = rs.convert(model, paradigm=1, norm="L1", K=3, lam=0.5)
    rs.save(nrpm, "mlp.nrpm.safetensors")              # surgery convert ... -o
    same = rs.load("mlp.nrpm.safetensors")
    rs.evaluate(nrpm, "mnist", attacks=("fgsm", "pgd"), eps=(0.1,))   # surgery evaluate
    rs.finetune(nrpm, "mnist", paradigm=2)                             # surgery finetune
    rs.purification_report(model, "mnist", "fc1", basis="ica")         # surgery purification
    rs.reprogram_ar(source, x, y)                                      # surgery reprogram ar
"""
__version__ = "0.1.0"

from robust_surgery.evaluation.attacks import register_attack
from robust_surgery.evaluation.run import EvalReport, evaluate
from robust_surgery.training.finetune import finetune
from robust_surgery.io.archspec import register_builder
from robust_surgery.errors import ModelLoadError, NonFiniteError, OutputPathError, StateMismatchError, UntrustedCodeError, UserError
from robust_surgery.io.model_file import build_arch, load, load_model, read_manifest, save
from robust_surgery.nn.functional import register_reweight_derivative
from robust_surgery.nn import (
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
from robust_surgery.surgery.presets import preset_for, preset_note, register_preset
from robust_surgery.surgery.recalibrate import recalibrate_batchnorm
from robust_surgery.surgery.report import ConversionReport, conversion_report, inspect_model
from robust_surgery.surgery.convert import (
    PARADIGMS,
    LayerConfig,
    NoLayerMatchedError,
    convert,
    convertible_types,
    is_converted,
    nrpm_layers,
    register_converter,
    set_lam,
    unconvert,
)

# Purification diagnostics and reprogramming load on first use (they pull in scikit-learn).
_LAZY = {
    "pretrain": "robust_surgery.training.pretrain",
    "purification_report": "robust_surgery.purification.diagnostics",
    "purity_scores": "robust_surgery.purification.scores",
    "compare_encoders": "robust_surgery.purification.inherit",
    "SparseCodingTask": "robust_surgery.purification.synthetic",
    "reprogram_ar": "robust_surgery.reprogram", "reprogram_bar": "robust_surgery.reprogram",
    "run_r2dl": "robust_surgery.reprogram.r2dl",
    "load_peptide_task": "robust_surgery.data.sequences",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    "convert", "unconvert", "set_lam", "nrpm_layers", "is_converted", "register_converter", "convertible_types",
    "register_reweight", "register_reweight_derivative", "reweight_names", "LayerConfig", "NoLayerMatchedError", "PARADIGMS",
    "NRPMSettings", "NRPMLayer", "NRPMLinear", "NRPMConv1d", "NRPMConv2d", "NRPMConv3d", "linear_mode", "straight_through_mode",
    "load", "load_model", "save", "build_arch", "read_manifest", "register_builder",
    "UserError", "ModelLoadError", "UntrustedCodeError", "OutputPathError", "StateMismatchError", "NonFiniteError",
    "preset_for", "preset_note", "register_preset", "recalibrate_batchnorm",
    "ConversionReport", "conversion_report", "inspect_model", "evaluate", "EvalReport", "register_attack", "finetune",
    *_LAZY,
]
