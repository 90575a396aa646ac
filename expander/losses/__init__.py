"""Losses of expansion training. Each returns a batch mean; names follow ``loss_*``, weights ``lambda_*``."""

from .nada import loss_composed_edits, loss_nada, loss_nada_consistency, loss_nada_image_exclusive, loss_nada_negative, nada_image_directions, nada_image_features
from .replay import loss_edit_detail, loss_lowpass_change, loss_replay
from .mystyle import loss_mystyle
from .adversarial import loss_d_logistic, loss_g_nonsaturating, loss_r1

__all__ = ["loss_composed_edits", "loss_nada", "loss_nada_consistency", "loss_nada_image_exclusive", "loss_nada_negative", "nada_image_directions", "nada_image_features", "loss_edit_detail", "loss_lowpass_change", "loss_replay", "loss_mystyle", "loss_d_logistic", "loss_g_nonsaturating", "loss_r1"]
