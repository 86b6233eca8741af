"""Tuning defenses behind one registry: `--method NAME` -> a Defense.

Importing this package registers the built-in methods (ft, lp, fe-tuning, ft-init, fst, fst-kd, ft-kd,
pam, ft-sam, nad, clp, d3, sau). Each method declares its own hyper-parameters beside it, as a small
frozen dataclass (FstParams, NadParams, ...: its `params_type`); DefenseParams holds one, with the SGD settings.
"""

from .base import DEFENSES, Defense, DefenseOutcome, DefenseParams, default_params, get_defense

# The import order is the registration order: the order `--method` choices are listed in.
# isort: off
from . import finetune as _finetune  # noqa: F401  (registers ft, lp, fe-tuning, ft-init)
from . import fst as _fst  # noqa: F401  (registers fst)
from . import distill as _distill  # noqa: F401  (registers fst-kd)
from . import pam as _pam  # noqa: F401  (registers pam)
from . import ft_sam as _ft_sam  # noqa: F401  (registers ft-sam)
from . import nad as _nad  # noqa: F401  (registers nad)
from . import clp as _clp  # noqa: F401  (registers clp)
from . import unlearn as _unlearn  # noqa: F401  (registers unlearn)
from . import d3 as _d3  # noqa: F401  (registers d3)
from . import sau as _sau  # noqa: F401  (registers sau)
# isort: on

__all__ = ["DEFENSES", "Defense", "DefenseParams", "DefenseOutcome", "default_params", "get_defense"]
