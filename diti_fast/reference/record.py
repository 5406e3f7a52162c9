"""Record a fixture in the golden-tensor format from this project's own reference path.

    python -m diti_fast.reference.record OUT.pt [--dtype float64] [--seed 0]

Used to exercise the checker on other configurations (levels, heads, attention order, balanced
masks) than the shared golden file. A fixture recorded here is NOT an independent oracle — the
original code's file is — but recording in float64 and checking in float32 does test that the
checker reads any file of the format and that the float32 path stays within tolerance.
"""
from __future__ import annotations

import argparse

import torch

from ..config import model_config_from_original
from ..diffusion import make_schedule, q_sample
from ..losses import conditioning, weighted_shift_loss_ref
from ..masks import TimestepMasks
from ..nn import build_decoder, build_encoder, build_unet
from ..weights import diff_state
from ..sampling import masked_ddim

DEFAULT_UNET = dict(input_channel=3, base_channel=32, channel_multiplier=[1, 2, 2], num_residual_blocks_of_a_block=2,
                    attention_resolutions=[2, 4], num_heads=2, head_channel=-1, use_new_attention_order=True,
                    dropout=0.0, latent_dim=512)
DEFAULT_DIFFUSION = dict(timesteps=1000, betas_type="linear", linear_beta_start=0.0001, linear_beta_end=0.02)
DEFAULT_SSL = dict(k=64)  # balanced masks


def record(unet_config=None, diffusion_config=None, ssl_config=None, t=(0, 15, 500, 999), image_size=64,
           ddim_steps=10, dtype=torch.float64, seed=0) -> dict:
    unet_config = dict(unet_config or DEFAULT_UNET)
    diffusion_config = dict(diffusion_config or DEFAULT_DIFFUSION)
    ssl_config = dict(ssl_config or DEFAULT_SSL)
    encoder_name = {32: "shapes32", 64: "celeba64", 128: "ffhq128"}[image_size]
    cfg = model_config_from_original(unet_config, diffusion_config, ssl_config, encoder=encoder_name)
    gen = torch.Generator().manual_seed(seed)
    encoder, decoder = build_encoder(cfg), build_decoder(cfg)
    # Perturb every parameter (zero-initialised ones too) so that every path carries signal.
    with torch.no_grad():
        for p in list(encoder.parameters()) + list(decoder.parameters()):
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    encoder_state = {k: v.clone() for k, v in encoder.state_dict().items()}
    decoder_state = {k: v.clone() for k, v in decoder.state_dict().items()}
    encoder.to(dtype).eval()
    decoder.to(dtype).eval()

    B = len(t)
    x0 = (torch.rand(B, 3, image_size, image_size, generator=gen) * 2 - 1).to(dtype)
    noise = torch.randn(B, 3, image_size, image_size, generator=gen).to(dtype)
    t = torch.tensor(t, dtype=torch.long)
    sched32 = make_schedule(cfg.diffusion)
    sched = type(sched32)(**{k: v.to(dtype) for k, v in sched32.__dict__.items()})
    masks = TimestepMasks.build(cfg.masks, cfg.unet.latent_dim, cfg.diffusion.timesteps)

    z = encoder(x0)
    x_t = q_sample(sched, x0, t, noise)
    eps_hat, g = decoder(x_t, t, conditioning(z, t, masks, "base"))
    elem = weighted_shift_loss_ref(noise, eps_hat, g, t, sched)
    loss = elem.mean()
    loss.backward()
    grads = {f"encoder.{n}": p.grad.float().clone() for n, p in encoder.named_parameters()}
    grads.update({f"decoder.{n}": p.grad.float().clone() for n, p in decoder.named_parameters() if p.requires_grad})

    stop = {}
    z_leaf = z.detach().requires_grad_(True)
    for mode, lk, gk in (("base", "loss_base", "dz_base"), ("stop_grad", "loss_stop_grad", "dz_stop_grad")):
        e, gg = decoder(x_t, t, conditioning(z_leaf, t, masks, mode))
        l = weighted_shift_loss_ref(noise, e, gg, t, sched).mean()
        stop[lk] = l.detach().float()
        stop[gk] = torch.autograd.grad(l, z_leaf)[0].float()

    unet = build_unet(cfg).to(dtype).eval()
    missing, unexpected, _ = diff_state(unet, decoder_state)
    unet.load_state_dict({k: v for k, v in decoder_state.items() if k not in unexpected}, strict=False)
    with torch.no_grad():
        unet_eps = unet(x_t, t)
        zd = z.detach()
        x_T = masked_ddim(decoder, x0, zd, sched, masks, steps=ddim_steps, inverse=True)
        x_rec = masked_ddim(decoder, x_T, zd, sched, masks, steps=ddim_steps)
    f = lambda v: v.detach().float().clone()  # noqa: E731
    tables = masks.tables()
    return {
        "about": "recorded by diti_fast.reference.record (project's own reference path), not the original code",
        "unet_config": unet_config, "diffusion_config": diffusion_config, "ssl_config": ssl_config,
        "schedule": {k: getattr(sched32, k).clone() for k in ("betas", "alphas_cumprod", "shift_coef", "weight")},
        "t_to_idx": masks.t_to_idx.clone(), "mask_end_dims": masks.end_dims.clone(), **tables,
        "encoder_state": encoder_state, "decoder_state": decoder_state,
        "x0": f(x0), "noise": f(noise), "t": t, "idx": masks.t_to_idx[t].clone(), "z": f(z), "x_t": f(x_t),
        "eps_hat": f(eps_hat), "shift_G": f(g), "loss": f(loss), "loss_per_element": f(elem), "grads": grads,
        "stop_grad": stop, "unet_eps": f(unet_eps), "unet_missing_keys": sorted(missing),
        "unet_unexpected_keys": sorted(unexpected),
        "ddim": {"steps": ddim_steps, "x_T": f(x_T), "x_rec": f(x_rec)},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diti_fast.reference.record", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.save(record(dtype=getattr(torch, args.dtype), seed=args.seed), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
