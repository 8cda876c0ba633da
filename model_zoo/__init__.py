"""Architectures and weights of the model zoo (installed as ``robust_surgery.model_zoo``).

Importing this package registers every model with :mod:`robust_surgery.io.zoo`; use
``robust_surgery.io.zoo.create_model(name)`` / ``list_models()`` rather than the builders directly.
One module per family; ``checkpoints/`` holds the small embedded weights trained by
:mod:`robust_surgery.model_zoo.train`.
"""
from . import cifar_resnet, mnist_cnn, mnist_lenet, mnist_mlp, tiny_resnet  # noqa: F401  (registration)
from . import text_sentiment  # noqa: F401  (registration; the encoder itself needs the [text] extra)
from . import hardened  # noqa: E402  (hardened models register after the bases they start from)
from .common import Normalize

hardened._register_shipped()

__all__ = ["Normalize", "cifar_resnet", "hardened", "mnist_cnn", "mnist_lenet", "mnist_mlp", "tiny_resnet"]
