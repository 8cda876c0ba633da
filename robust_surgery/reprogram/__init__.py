"""Model reprogramming: reuse a frozen (hardened) source model for a new task.

AR (white-box), BAR (black-box, zeroth-order) and R2DL (dictionary learning for sequences) share
one shape: an input transformation (the program), a frozen source model and an output label
mapping. ``docs/reprogramming.md`` describes the methods and their settings.

Image reprogramming (AR, BAR)::

    from robust_surgery.reprogram import ARConfig, reprogram_ar, load_target, save_reprogrammed
    model, report = reprogram_ar(rs.load_model("zoo:cifar-resnet20"), *load_target("mnist", n=8000))
    save_reprogrammed(model, "ar.safetensors")   # rs.load / surgery evaluate rebuild it
"""
from robust_surgery.reprogram.ar import ARConfig, reprogram_ar, train_ar
from robust_surgery.reprogram.bar import BARConfig, reprogram_bar, train_bar
from robust_surgery.reprogram.losses import class_balance_weights, focal_loss, mapped_nll
from robust_surgery.reprogram.mapping import (LabelMapping, LinearMapping, frequency_mapping, mapping_from_dict,
                                             one_to_one, random_mapping)
from robust_surgery.reprogram.pipeline import (ReprogrammedModel, build_reprogrammed, choose_mapping, load_source, load_target,
                       save_reprogrammed, target_accuracy)
from robust_surgery.reprogram.program import CanvasSpec, Program, centre_embed, data_mask
from robust_surgery.reprogram.query import QueryBudgetExceeded, QueryOracle
from robust_surgery.reprogram.zo import unit_sphere, zo_gradient

__all__ = [
    "ARConfig", "reprogram_ar", "train_ar", "BARConfig", "reprogram_bar", "train_bar",
    "class_balance_weights", "focal_loss", "mapped_nll",
    "LabelMapping", "LinearMapping", "mapping_from_dict", "frequency_mapping", "one_to_one", "random_mapping",
    "ReprogrammedModel", "build_reprogrammed", "choose_mapping", "load_source", "load_target", "save_reprogrammed",
    "target_accuracy", "CanvasSpec", "Program", "centre_embed", "data_mask", "QueryBudgetExceeded", "QueryOracle",
    "unit_sphere", "zo_gradient",
]
