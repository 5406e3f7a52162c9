"""How big each part of the claim run is, and the thresholds its gates and rule use.

The full plan fits 100 minutes on 2 free CPU cores with room to spare: training is sized in
minutes, not images. The DDPM trains for ``ddpm_minutes``; the first arm run (DiTi base, seed 0)
trains for ``arm_minutes`` and the number of images it reached becomes every other arm run's
length, so all six arm runs see the same number of images. The smoke plan fixes images instead
(deterministic, seconds): it proves the pipeline end to end and decides nothing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Plan:
    name: str
    train_samples: int = 40000      # training shards (seed 0); the design has 8,192 distinct images
    design_images: int = 512        # images of the exact-Bayes lost-t table
    test_images: int = 1024         # images of the stage-share metric (their own seed)
    heldout_images: int = 2048      # images of the loss gates (another seed)
    batch_size: int = 64
    ddpm_minutes: float = 28.0
    arm_minutes: float = 7.0
    ddpm_images: int = 0            # > 0: train this many images instead of ddpm_minutes (smoke)
    arm_images: int = 0             # > 0: likewise for every arm run
    ddpm_lr: float = 5e-4
    diti_lr: float = 5e-4
    seeds: tuple[int, ...] = (0, 1)
    arms: tuple[str, ...] = ("diti", "diti_stopgrad", "pdae")
    probe: bool = True              # measure the fastest CPU path (else fp32 eager)
    # Gate 1, the DDPM: per 100-step t-bucket below t=500 its ε-MSE exceeds the exact posterior-mean
    # denoiser's by at most ddpm_excess; and its DDIM samples are near a design image.
    ddpm_excess: float = 0.05
    sample_count: int = 64
    sample_steps: int = 50
    sample_max_rms: float = 0.05    # model units, RMS over pixels (a grey level is 0.0078)
    sample_min_valid: float = 0.8
    # Gate 2, z is used: shuffling z across held-out images raises each arm run's loss by this much.
    z_gate: float = 0.10
    # Gate 3, the factors are in z: a factor the encoder ignores has no place in it, so its stage
    # shares would be noise. Every factor of the metric must move z by this fraction of what another
    # image does (stage_share.sensitivity), in every arm run.
    min_sensitivity: float = 0.01
    bootstrap: int = 2000
    checkpoint_every: int = 500

    def to_json(self) -> dict:
        return asdict(self)


FULL = Plan("full")

SMOKE = Plan("smoke", train_samples=512, design_images=24, test_images=48, heldout_images=64, batch_size=16,
             ddpm_images=64, arm_images=32, probe=False, sample_count=4, sample_steps=2, bootstrap=50,
             checkpoint_every=2)

PLANS = {"full": FULL, "smoke": SMOKE}
