"""How big each phase of the claim run is: the full run (≤ 100 min on 2 free CPU cores) and the smoke run.

Calibration (docs/evaluation.md, "The claim"): the shapes32 UNet at batch 32 trains at 16–20 images/s
(DDPM) and 9–12 images/s (DiTi/PDAE step: encoder + frozen UNet + ShiftUNet) with ONE thread under
``nice -n 15`` on the shared 2-core development machine; ×1.8 for two free threads gives ~29–36 and
~17–21 images/s, and ``make demo`` measured 28 (DDPM) and 27 (DiTi) images/s on 2 cores at light load.
The plan uses the slow ends, 25 and 18 images/s, so that it fits a machine a little slower than that.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Throughputs the phase sizes below were derived from (2 free cores, images per second).
ASSUMED_IMAGES_PER_S = {"ddpm": 25.0, "diti": 18.0}


@dataclass(frozen=True)
class Plan:
    name: str
    train_samples: int          # synthetic training shards (the clear variant, seed 0)
    eval_samples: int           # held-out shards (seed 1) for probes, judge and grids
    ddpm_images: int            # DDPM length cap
    ddpm_checks: int            # recognisability checks spread over ddpm_images (stop early when passed)
    diti_images: int            # DiTi (base) and PDAE: the same number of images each
    batch_size: int = 32
    ddpm_lr: float = 2e-4
    diti_lr: float = 2e-4
    judge_train: int = 4000     # real images the recognisability judge is trained on
    judge_epochs: int = 12
    judge_samples: int = 128    # DDPM samples it classifies
    sample_steps: int = 50      # DDIM steps of those samples
    recognisable: float = 0.8   # pass: confident fraction of samples >= this x that of real images
    probe_samples: int = 8000   # eval samples featurised (80/10/10 by position)
    probe_epochs: int = 15
    probe_seeds: tuple[int, ...] = (0, 1)
    bootstrap: int = 1000       # resamples of the test split
    invert_steps: int = 100     # counterfactual grids: DDIM inversion / decoding steps
    decode_steps: int = 100
    alphas: tuple[float, ...] = (0.0, 0.5, 1.0)
    grid_pairs: int = 6         # test pairs scored by the judge (the first one drawn)
    checkpoint_every: int = 200
    minutes: dict = field(default_factory=dict)  # planned minutes per phase (informational)

    def to_json(self) -> dict:
        return asdict(self)


def _minutes(ddpm_images: int, diti_images: int) -> dict:
    ddpm = ddpm_images / ASSUMED_IMAGES_PER_S["ddpm"] / 60
    diti = diti_images / ASSUMED_IMAGES_PER_S["diti"] / 60
    # judge, attribution, grids: from 1-thread timings under load (docs/evaluation.md), not full-size runs.
    return {"shards": 0.5, "ddpm": round(ddpm, 1), "judge": 4.0, "diti": round(diti, 1), "pdae": round(diti, 1),
            "attribution": 4.0, "grids": 6.0, "report": 0.5}


FULL = Plan("full", train_samples=20000, eval_samples=8000, ddpm_images=54400, ddpm_checks=3,
            diti_images=17600, minutes=_minutes(54400, 17600))

# Every phase on tiny sizes: proves the pipeline end to end (tests/test_claim.py), says nothing.
SMOKE = Plan("smoke", train_samples=256, eval_samples=200, ddpm_images=64, ddpm_checks=2, diti_images=64,
             batch_size=16, judge_train=160, judge_epochs=1, judge_samples=8, sample_steps=2, probe_samples=200,
             probe_epochs=2, bootstrap=50, invert_steps=2, decode_steps=2, grid_pairs=2, checkpoint_every=2,
             minutes=_minutes(64, 64))

PLANS = {"full": FULL, "smoke": SMOKE}
