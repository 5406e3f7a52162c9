"""``diti-fast import-original``: a checkpoint of the original code -> this project's export.

    diti-fast import-original RUN/checkpoints/latest.pt --config celeba64_diti64 --out runs/orig-diti64
    diti-fast import-original pre-trained-dpms/celeba64/checkpoint.pt --config celeba64 --out runs/orig-ddpm

The checkpoint decides the stage: ``{"encoder", "decoder", "ema_encoder", "ema_decoder", ...}`` (a DiTi or
PDAE run) becomes a diti export, ``{"ema_denoise_fn", ...}`` (a pre-trained DDPM) a ddpm export, written
to ``OUT/export/ema.safetensors`` with the resolved config of ``--config`` (a preset or a YAML file, plus
``key=value`` overrides) in its metadata, so every ``diti-fast eval`` command and ``init.ddpm`` take it.

The original's checkpoints hold no model hyper-parameters; its YAML files do, and they are checked
against the preset before any weight is read (an error names each field that differs):

* the DDPM's ``config.yml`` (``--ddpm-config``; default: the ``config.yml`` beside a DDPM checkpoint):
  ``denoise_fn_config`` against ``model.unet``, including the settings a weight shape cannot reveal
  (num_heads, head_channel, use_new_attention_order, dropout), and ``diffusion_config``;
* the run's ``config.yml`` (``--run-config``; default: ``RUN/config.yml`` for ``RUN/checkpoints/X.pt``):
  ``ssl_config`` (k, stages, dims_per_stage, pdae_mode) against ``model.masks`` / ``diti.mode``, the
  encoder class against ``model.encoder.name``, and ``diffusion_config``. A run config without
  ``ssl_config`` is the original's pdae.yml: ``diti.mode`` must be ``pdae``.

Both files are read with ``yaml.safe_load``. ``_orig_mod.`` key prefixes (the original's ``--compile``)
are stripped.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError
from .engine.config_files import load_config, resolved_dict
from .nn import build_decoder, build_encoder, build_unet
from .nn.encoder import ENCODER_SPECS
from .original_configs import check_ddpm_config, check_run_config
from .weights import (DDPM_KEYS, RUN_KEYS, CheckpointError, export_path, load_original_ddpm, load_original_run,
                      save_export, torch_load)

def checkpoint_kind(data: dict, path) -> str:
    if all(k in data for k in RUN_KEYS):
        return "diti"
    if any(k in data for k in DDPM_KEYS):
        return "ddpm"
    raise CheckpointError(f"{path}: neither an original DiTi/PDAE run (keys {list(RUN_KEYS)}) nor an original DDPM "
                          f"(one of {list(DDPM_KEYS)}); its top-level keys are {sorted(map(str, data))[:12]}")


def _default_beside(ckpt: Path, kind: str) -> Path | None:
    """config.yml beside a DDPM checkpoint; RUN/config.yml for RUN/checkpoints/NAME.pt."""
    cand = ckpt.parent / "config.yml" if kind == "ddpm" else ckpt.parent.parent / "config.yml"
    return cand if cand.is_file() else None


def import_original(ckpt: str | Path, out: str | Path, config: str, overrides: list[str] | None = None,
                    ddpm_config: str | Path | None = None, run_config: str | Path | None = None,
                    use_ema: bool = True, log=print) -> Path:
    """Convert; returns the export path. Every check runs before the (large) checkpoint is converted."""
    ckpt = Path(ckpt)
    data = torch_load(ckpt)
    kind = checkpoint_kind(data, ckpt)
    cfg = load_config(config, (["stage=ddpm"] if kind == "ddpm" else []) + list(overrides or []))
    unchecked: list[str] = []
    ddpm_config = Path(ddpm_config) if ddpm_config else (_default_beside(ckpt, "ddpm") if kind == "ddpm" else None)
    if ddpm_config is not None:
        unchecked = check_ddpm_config(cfg.model, ddpm_config)
    else:
        log("no DDPM config.yml given: the UNet's shape-invisible settings (heads, attention order, dropout) "
            "are taken from the preset unchecked (--ddpm-config to check them)")
    if kind == "diti":
        run_config = Path(run_config) if run_config else _default_beside(ckpt, "diti")
        if run_config is not None:
            check_run_config(cfg, run_config)
        else:
            log("no run config.yml found: masks and mode are taken from the preset unchecked (--run-config)")
    resolved = resolved_dict(cfg)
    if not resolved["data"]["image_size"]:
        resolved["data"]["image_size"] = ENCODER_SPECS[cfg.model.encoder.name][0]
    resolved["imported_from"] = {"checkpoint": str(ckpt.resolve()), "use_ema": use_ema,
                                 "ddpm_config": str(ddpm_config) if ddpm_config else None,
                                 "run_config": str(run_config) if kind == "diti" and run_config else None,
                                 "unchecked_ddpm_fields": unchecked}
    dest = export_path(out)
    if kind == "ddpm":
        unet = build_unet(cfg.model)
        load_original_ddpm(unet, data, use_ema=use_ema)
        return save_export(dest, "ddpm", cfg.model, resolved, unet=unet)
    enc, dec = build_encoder(cfg.model), build_decoder(cfg.model)
    load_original_run(enc, dec, data, use_ema=use_ema)
    return save_export(dest, "diti", cfg.model, resolved, encoder=enc, decoder=dec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="diti-fast import-original", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="the original's checkpoint .pt (a DiTi/PDAE run or a DDPM)")
    ap.add_argument("--out", required=True, help="run directory to create; the export goes to OUT/export/")
    ap.add_argument("--config", required=True, help="preset name or YAML file describing the model")
    ap.add_argument("--ddpm-config", help="the original DDPM's config.yml (default: beside a DDPM checkpoint)")
    ap.add_argument("--run-config", help="the original run's config.yml (default: RUN/config.yml)")
    ap.add_argument("--raw", action="store_true", help="the non-EMA weights (encoder/decoder, denoise_fn)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after the options
    try:
        path = import_original(args.checkpoint, args.out, args.config, args.overrides, args.ddpm_config,
                               args.run_config, use_ema=not args.raw, log=lambda m: print(m, file=sys.stderr))
    except (ConfigError, CheckpointError) as e:
        print(f"diti-fast import-original: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
