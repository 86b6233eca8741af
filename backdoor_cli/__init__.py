"""bdclean: audit and purify image classifiers that may carry a backdoor."""

__version__ = "0.1.0"
