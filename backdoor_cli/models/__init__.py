"""Models: one module per job.

- architectures: the built-in networks and their registry
- building: a fresh model from a name, torchvision, or the user's own file
- loading: strict weight loading with a readable key diff
- head: finding the classifier head in forward order
- guessing: what a state_dict's keys and shapes reveal (never their order in the file)
- shapes: class count and input channels read under the known architecture's own key names
- output_kind: whether the forward returns logits, probabilities or log-probabilities, and the tuning loss that fits
- hub_config: what a Hugging Face / timm model directory's JSON says, checked as untrusted data
- hub: building such a model, loading it as a Subject, writing the purified copy in its layout
"""

from .architectures import ARCHITECTURES
from .building import arch_file_source, build_model, is_file_arch
from .guessing import ArchGuess, guess_architecture
from .head import find_head
from .loading import load_strict
from .shapes import ShapeFacts, read_shape_facts

__all__ = [
    "ARCHITECTURES",
    "ArchGuess",
    "ShapeFacts",
    "arch_file_source",
    "build_model",
    "find_head",
    "guess_architecture",
    "is_file_arch",
    "load_strict",
    "read_shape_facts",
]
