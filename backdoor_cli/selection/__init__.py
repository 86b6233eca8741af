"""Selection: what purify runs and which result it keeps - the recipe, held-out images, the point on the path.

- recipe: the method, the held-out share and the selection (the default when no --method is given)
- holdout: held-out clean images and the selection by epoch
- path_select: the trigger-free point on the line back to the input, from held-out accuracy
- linear_path: C-Acc and ASR along the line between two checkpoints
"""

from .holdout import HoldoutMonitor, split_holdout
from .linear_path import PathReport, path_markdown, path_plot_png, path_points, render_path, walk_path
from .path_select import memorised_warning, select_on_path
from .recipe import CAVEAT, RECOMMENDED_METHOD, Recipe, fit_to_clean_data, resolve_recipe

__all__ = [
    "CAVEAT",
    "HoldoutMonitor",
    "PathReport",
    "RECOMMENDED_METHOD",
    "Recipe",
    "fit_to_clean_data",
    "memorised_warning",
    "path_markdown",
    "path_plot_png",
    "path_points",
    "render_path",
    "resolve_recipe",
    "select_on_path",
    "split_holdout",
    "walk_path",
]
