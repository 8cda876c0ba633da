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

# Every public name loads on first use (PEP 562), so `import robust_surgery` costs nothing until
# a name is used: the CLI answers --help without importing torch, torchattacks or scikit-learn.
_LAZY = {
    "register_attack": "robust_surgery.evaluation.attacks",
    "EvalReport": "robust_surgery.evaluation.run", "evaluate": "robust_surgery.evaluation.run",
    "finetune": "robust_surgery.training.finetune",
    "register_builder": "robust_surgery.io.archspec",
    **{name: "robust_surgery.errors" for name in ("ModelLoadError", "NonFiniteError", "OutputPathError",
                                                   "StateMismatchError", "UntrustedCodeError", "UserError")},
    **{name: "robust_surgery.io.model_file" for name in ("build_arch", "load", "load_model", "read_manifest", "save")},
    "register_reweight_derivative": "robust_surgery.nn.functional",
    **{name: "robust_surgery.nn" for name in ("NRPMConv1d", "NRPMConv2d", "NRPMConv3d", "NRPMLayer", "NRPMLinear",
                                              "NRPMSettings", "linear_mode", "register_reweight",
                                              "straight_through_mode", "reweight_names")},
    **{name: "robust_surgery.surgery.presets" for name in ("preset_for", "preset_note", "register_preset")},
    "recalibrate_batchnorm": "robust_surgery.surgery.recalibrate",
    **{name: "robust_surgery.surgery.report" for name in ("ConversionReport", "conversion_report", "inspect_model")},
    **{name: "robust_surgery.surgery.convert" for name in ("PARADIGMS", "LayerConfig", "NoLayerMatchedError", "convert",
                                                           "convertible_types", "is_converted", "nrpm_layers",
                                                           "register_converter", "set_lam", "unconvert")},
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
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    try:  # a subpackage or module: rs.errors, rs.surgery.presets, rs.nn.backends ...
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = ["__version__", *_LAZY]
