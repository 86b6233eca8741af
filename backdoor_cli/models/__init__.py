"""Models: one module per job.

- architectures: the built-in networks and their registry
- building: a fresh model from a name, torchvision, or the user's own file
- loading: strict weight loading with a readable key diff
- head: finding the classifier head in forward order
- guessing: what a state_dict's keys and shapes reveal (never their order in the file)
- hub_config: what a Hugging Face / timm model directory's JSON says, checked as untrusted data
- hub: building such a model, loading it as a Subject, writing the purified copy in its layout
"""

from .architectures import ARCHITECTURES
from .building import build_model
from .guessing import ArchGuess, guess_architecture
from .head import find_head
from .loading import load_strict

__all__ = ["ARCHITECTURES", "ArchGuess", "build_model", "find_head", "guess_architecture", "load_strict"]
