"""Fixture checker: recompute every quantity of a golden-tensor file and compare.

    python -m diti_fast.reference.check FIXTURE.pt [--attention sdpa|math|xformers]
                                                    [--fused-norm] [--fused-loss] [--skip-ddim]
                                                    [--channels-last auto|true|false]

The file format is described in tests/fixtures/golden/README.md. The model is built from the file's own
configs through the project's normal loading path (typed configs, strict state-dict loading), so the
checker works for any file of that format. Exit status 1 when any quantity is out of tolerance.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..weights import CheckpointError, diff_state, load_state
from ..config import FastConfig, model_config_from_original
from ..diffusion import make_schedule, q_sample
from ..losses import conditioning, shift_loss, weighted_shift_loss_ref
from ..masks import TimestepMasks
from ..nn import build_decoder, build_encoder, build_unet
from ..sampling import masked_ddim


class FixtureError(ValueError):
    """The fixture file is not in the expected format (names the key and the problem)."""


# key -> expected kind; tensors get shape checks below
REQUIRED = {
    "unet_config": dict, "diffusion_config": dict, "ssl_config": dict, "schedule": dict,
    "t_to_idx": torch.Tensor, "mask_end_dims": torch.Tensor, "masks": torch.Tensor,
    "k_masks": torch.Tensor, "receding_masks": torch.Tensor, "encoder_state": dict,
    "decoder_state": dict, "x0": torch.Tensor, "noise": torch.Tensor, "t": torch.Tensor,
    "idx": torch.Tensor, "z": torch.Tensor, "x_t": torch.Tensor, "eps_hat": torch.Tensor,
    "shift_G": torch.Tensor, "loss": torch.Tensor, "loss_per_element": torch.Tensor, "grads": dict,
    "stop_grad": dict, "unet_eps": torch.Tensor, "unet_missing_keys": list,
    "unet_unexpected_keys": list, "ddim": dict,
}
OPTIONAL = {"about"}
ENCODER_BY_SIZE = {32: "shapes32", 64: "celeba64", 128: "ffhq128"}


def load_fixture(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FixtureError(f"fixture {path} does not exist")
    try:
        fx = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FixtureError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from None
    if not isinstance(fx, dict):
        raise FixtureError(f"{path}: top level must be a dict")
    missing = sorted(set(REQUIRED) - set(fx))
    unexpected = sorted(set(fx) - set(REQUIRED) - OPTIONAL)
    wrong = [f"{k} (expected {REQUIRED[k].__name__}, got {type(fx[k]).__name__})"
             for k in REQUIRED if k in fx and not isinstance(fx[k], REQUIRED[k])]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if wrong:
        problems.append(f"wrong types: {', '.join(wrong)}")
    if problems:
        raise FixtureError(f"{path}: " + "; ".join(problems))
    x0 = fx["x0"]
    if x0.ndim != 4:
        raise FixtureError(f"{path}: x0 must be [B, C, H, W], got shape {tuple(x0.shape)}")
    B = x0.shape[0]
    for k in ("noise", "x_t", "eps_hat", "shift_G", "loss_per_element", "unet_eps"):
        if tuple(fx[k].shape) != tuple(x0.shape):
            raise FixtureError(f"{path}: {k} has shape {tuple(fx[k].shape)}, expected {tuple(x0.shape)} like x0")
    for k in ("t", "idx"):
        if tuple(fx[k].shape) != (B,):
            raise FixtureError(f"{path}: {k} has shape {tuple(fx[k].shape)}, expected ({B},)")
    for k in ("betas", "alphas_cumprod", "shift_coef", "weight"):
        if k not in fx["schedule"]:
            raise FixtureError(f"{path}: schedule is missing key {k!r}")
    for sub, keys in (("stop_grad", ("loss_base", "loss_stop_grad", "dz_base", "dz_stop_grad")),
                      ("ddim", ("steps", "x_T", "x_rec"))):
        absent = [k for k in keys if k not in fx[sub]]
        if absent:
            raise FixtureError(f"{path}: {sub} is missing keys {absent}")
    return fx


@dataclass
class Row:
    name: str
    err: float
    scale: float
    tol: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.err <= self.tol


def _err(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    if ours.shape != ref.shape:
        raise FixtureError(f"shape mismatch: ours {tuple(ours.shape)} vs recorded {tuple(ref.shape)}")
    return (ours - ref).abs().max().item() if ref.numel() else 0.0, ref.abs().max().item() if ref.numel() else 0.0


def forward_row(name, ours, ref) -> Row:
    e, s = _err(ours, ref)
    return Row(name, e, s, 1e-5 * s + 1e-7)


def exact_row(name, ours, ref) -> Row:
    e, s = _err(ours, ref)
    return Row(name, e, s, 0.0)


def run_check(path: str | Path, fast: FastConfig | None = None, skip_ddim: bool = False,
              device: str = "cpu") -> list[Row]:
    fast = fast or FastConfig()
    fx = load_fixture(path)
    size = fx["x0"].shape[-1]
    if size not in ENCODER_BY_SIZE:
        raise FixtureError(f"{path}: no encoder for {size}px images (known: {sorted(ENCODER_BY_SIZE)})")
    cfg = model_config_from_original(fx["unet_config"], fx["diffusion_config"], fx["ssl_config"],
                                     encoder=ENCODER_BY_SIZE[size], where=f"{path}")
    dev_type = torch.device(device).type  # fast.channels_last="auto" means on for CUDA
    encoder = build_encoder(cfg, fast, dev_type).to(device)
    decoder = build_decoder(cfg, fast, dev_type).to(device)
    try:
        load_state(encoder, fx["encoder_state"], f"{path}: encoder_state")
        load_state(decoder, fx["decoder_state"], f"{path}: decoder_state")
    except CheckpointError as e:
        raise FixtureError(str(e)) from None
    # Dropout cannot be replayed, so fixtures are recorded without it: compare in eval mode.
    encoder.eval()
    decoder.eval()
    dev = lambda k: fx[k].to(device)  # noqa: E731
    rows: list[Row] = []

    sched = make_schedule(cfg.diffusion, device)
    for k in ("betas", "alphas_cumprod", "shift_coef", "weight"):
        rows.append(forward_row(f"schedule.{k}", getattr(sched, k), fx["schedule"][k]))
    masks = TimestepMasks.build(cfg.masks, cfg.unet.latent_dim, cfg.diffusion.timesteps, device)
    rows.append(exact_row("t_to_idx", masks.t_to_idx, fx["t_to_idx"]))
    rows.append(exact_row("mask_end_dims", masks.end_dims, fx["mask_end_dims"]))
    for k, v in masks.tables().items():
        rows.append(exact_row(k, v, fx[k]))
    t = dev("t")
    rows.append(exact_row("idx", masks.t_to_idx[t], fx["idx"]))

    # base-mode forward and backward through our whole chain: x0 -> z -> x_t -> (eps_hat, G) -> loss
    x0, noise = dev("x0"), dev("noise")
    z = encoder(x0)
    x_t = q_sample(sched, x0, t, noise)
    eps_hat, g = decoder(x_t, t, conditioning(z, t, masks, "base"))
    out = shift_loss(noise, eps_hat, g, t, sched, fused=fast.fused_loss)
    elem = weighted_shift_loss_ref(noise, eps_hat, g, t, sched)
    for name, ours, ref in (("z", z, "z"), ("x_t", x_t, "x_t"), ("eps_hat", eps_hat, "eps_hat"),
                            ("shift_G", g, "shift_G"), ("loss", out.loss, "loss"),
                            ("loss_per_element", elem, "loss_per_element")):
        rows.append(forward_row(name, ours, fx[ref]))
    out.loss.backward()
    params = {f"encoder.{n}": p for n, p in encoder.named_parameters()}
    params.update({f"decoder.{n}": p for n, p in decoder.named_parameters() if p.requires_grad})
    ref_grads = fx["grads"]
    if set(ref_grads) != set(params):
        miss, extra = sorted(set(ref_grads) - set(params)), sorted(set(params) - set(ref_grads))
        raise FixtureError(f"{path}: grads keys differ from the model's trainable parameters: "
                           f"recorded but not trainable {miss[:5]}, trainable but not recorded {extra[:5]}")
    gmax = max(v.abs().max().item() for v in ref_grads.values())
    worst = None
    for name, p in params.items():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        e, s = _err(grad, ref_grads[name])
        row = Row(f"grad {name}", e, s, 1e-4 * s + 1e-6 * gmax)
        if worst is None or (row.err / max(row.tol, 1e-30)) > (worst.err / max(worst.tol, 1e-30)):
            worst = row
        if not row.ok:
            rows.append(row)
    worst.note = f"worst of {len(params)} gradients"
    rows.append(worst)

    # dL/dz under the base and the stop_grad conditioning (same loss value, different gradient)
    z_leaf = z.detach().requires_grad_(True)
    for mode, lkey, gkey in (("base", "loss_base", "dz_base"), ("stop_grad", "loss_stop_grad", "dz_stop_grad")):
        e_hat, gg = decoder(x_t, t, conditioning(z_leaf, t, masks, mode))
        loss = shift_loss(noise, e_hat, gg, t, sched, fused=fast.fused_loss).loss
        (dz,) = torch.autograd.grad(loss, z_leaf)
        rows.append(forward_row(f"stop_grad.{lkey}", loss, fx["stop_grad"][lkey]))
        ref = fx["stop_grad"][gkey]
        e, s = _err(dz, ref)
        rows.append(Row(f"stop_grad.{gkey}", e, s, 1e-4 * s + 1e-6 * s))

    # the standalone frozen UNet, loaded from the decoder's state with strict=False semantics
    unet = build_unet(cfg, fast, dev_type).to(device).eval()
    missing, unexpected, shaped = diff_state(unet, fx["decoder_state"])
    if shaped:
        raise FixtureError(f"{path}: decoder_state has mis-shaped UNet keys: {shaped[:3]}")
    unet.load_state_dict({k: v for k, v in fx["decoder_state"].items() if k not in unexpected}, strict=False)
    rows.append(Row("unet_missing_keys", float(sorted(missing) != sorted(fx["unet_missing_keys"])), 0, 0,
                    f"{len(missing)} keys"))
    rows.append(Row("unet_unexpected_keys", float(sorted(unexpected) != sorted(fx["unet_unexpected_keys"])),
                    0, 0, f"{len(unexpected)} keys"))
    with torch.no_grad():
        rows.append(forward_row("unet_eps", unet(x_t, t), fx["unet_eps"]))

    if not skip_ddim:
        steps = int(fx["ddim"]["steps"])
        z_ref = dev("z")
        x_T = masked_ddim(decoder, x0, z_ref, sched, masks, steps=steps, inverse=True)
        e, s = _err(x_T, fx["ddim"]["x_T"])
        rows.append(Row("ddim.x_T", e, s, 5e-4, f"{steps}-step masked inversion"))
        x_rec = masked_ddim(decoder, fx["ddim"]["x_T"].to(device), z_ref, sched, masks, steps=steps)
        e, s = _err(x_rec, fx["ddim"]["x_rec"])
        rows.append(Row("ddim.x_rec", e, s, 1e-3, "max abs, from the recorded x_T"))
        mean_err = (x_rec.double().cpu() - fx["ddim"]["x_rec"].double()).abs().mean().item()
        rows.append(Row("ddim.x_rec (mean)", mean_err, s, 5e-5, "mean abs"))
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [f"{'quantity':<44} {'max abs err':>12} {'max |ref|':>11} {'rel err':>10} {'tol':>10}  status"]
    for r in rows:
        rel = r.err / r.scale if r.scale else 0.0
        lines.append(f"{r.name[:44]:<44} {r.err:12.3e} {r.scale:11.3e} {rel:10.2e} {r.tol:10.2e}  "
                     f"{'ok' if r.ok else 'FAIL'}{'  ' + r.note if r.note else ''}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diti_fast.reference.check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fixture", help="golden-tensor file (format: tests/fixtures/golden/README.md)")
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "math", "xformers"])
    ap.add_argument("--fused-norm", action="store_true", help="use the Triton adaptive GroupNorm kernel")
    ap.add_argument("--fused-loss", action="store_true", help="use the Triton DiTi loss kernel")
    ap.add_argument("--skip-ddim", action="store_true", help="leave out the 10-step DDIM quantities")
    ap.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"],
                    help="models in channels_last (auto: on CUDA, as the engine)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    cl = {"auto": "auto", "true": True, "false": False}[args.channels_last]
    fast = FastConfig(attention=args.attention, fused_norm=args.fused_norm, fused_loss=args.fused_loss,
                      channels_last=cl)
    try:
        rows = run_check(args.fixture, fast, args.skip_ddim, args.device)
    except (FixtureError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    bad = [r.name for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)} passed, {len(bad)} failed" + (f": {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
