"""Reconstruction quality: MSE, PSNR and SSIM per image, from scikit-image (``skimage.metrics``).

Images are compared in [0, 1] (model space [-1, 1] mapped by x/2 + 1/2, clipped), as float64 with
``data_range=1``; SSIM uses scikit-image's defaults (7x7 uniform window, per channel, averaged), which
need images of at least 7 px a side. The MSE is reported in [-1, 1] units too (4x the [0, 1] value),
the unit of the training loss and of the earlier ``reconstruction MSE``.
"""
from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity


def _unit(x: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> float64 [N, H, W, 3] in [0, 1]."""
    return (x.detach().double().cpu().clamp(-1, 1) * 0.5 + 0.5).permute(0, 2, 3, 1).numpy()


def reconstruction_quality(x: torch.Tensor, rec: torch.Tensor) -> dict:
    """Per-image and mean MSE / PSNR (dB) / SSIM of ``rec`` against ``x``."""
    a, b = _unit(x), _unit(rec)
    mse = [float(mean_squared_error(u, v)) for u, v in zip(a, b)]
    psnr = [float(peak_signal_noise_ratio(u, v, data_range=1.0)) if m > 0 else float("inf")
            for u, v, m in zip(a, b, mse)]
    ssim = [float(structural_similarity(u, v, data_range=1.0, channel_axis=-1)) for u, v in zip(a, b)]
    finite = [p for p in psnr if np.isfinite(p)]
    return {"mse_01": mse, "psnr_db": psnr, "ssim": ssim,
            "mean_mse_01": float(np.mean(mse)), "mean_mse_pm1": 4.0 * float(np.mean(mse)),
            "mean_psnr_db": float(np.mean(finite)) if finite else float("inf"), "mean_ssim": float(np.mean(ssim))}
