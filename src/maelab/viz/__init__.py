"""Figures: reconstruction grids (original | masked | reconstruction | + visible) and training curves."""

from maelab.viz.curves import read_metrics, save_loss_curve
from maelab.viz.reconstruction import default_title, reconstruct, save_reconstruction_grid

__all__ = ["default_title", "read_metrics", "reconstruct", "save_loss_curve", "save_reconstruction_grid"]
