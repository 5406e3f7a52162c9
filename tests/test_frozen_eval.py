"""The frozen DDPM inside DiTi's decoder runs in eval mode on every path: no dropout on ε̂.

DiTi trains only the shift branch; ε̂ comes from the frozen DDPM, which must run as the DDPM would
at sampling time (eval mode: dropout off), whatever mode the decoder is in. With
``model.unet.dropout > 0`` a frozen block left in train mode changes ε̂, so every ε̂ seen here is
compared bit for bit with an independent reference: a plain ``UNet`` built separately, loaded
straight from the frozen DDPM's safetensors file and kept in eval mode, run on the same x_t and t.

Paths covered (one module-scoped set of tiny runs, pinned to the CPU, one thread, bit-reproducible):
* ``ShiftUNet.train()`` / ``eval()`` round trips, directly and through a parent module;
* DeepSpeed's eager step (the engine wraps the model), a run resumed from its checkpoint, and the
  graph-safe step (``fast.cuda_graph=true`` runs it uncaptured on a CPU), each forward recorded by a
  forward hook, with the modules' ``training`` flags at that moment (a captured CUDA graph replays
  the kernels recorded from this same step body; hooks do not run on replay, so capture itself is
  left to the GPU checks);
* the EMA copy the training visuals sample from (``Visuals._ema_copy``);
* the exported model that ``eval`` and sampling load (``load_run``), through masked DDIM and the
  plain DDPM sampler.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from diti_fast.engine.loop import train
from diti_fast.nn import FROZEN, TRAINABLE
from diti_fast.nn.unet import ShiftUNet, UNet
from diti_fast.config import UNetConfig
from test_train_engine import TINY, ddpm_export, tiny  # noqa: F401 (ddpm_export is a fixture)

DROPOUT = 0.1


# ----------------------------------------------------------------------------- the reference

def _unet_cfg() -> UNetConfig:
    """The tiny engine model's UNet with dropout on."""
    return UNetConfig(**{**TINY["model"]["unet"], "dropout": DROPOUT})


def reference_ddpm(export: Path) -> UNet:
    """A plain UNet with the frozen DDPM's weights, read from the file without the engine's loaders,
    in eval mode (dropout > 0 in its config: only eval mode keeps it off)."""
    from safetensors.torch import load_file
    state = {k[len("unet."):]: v for k, v in load_file(str(export)).items() if k.startswith("unet.")}
    ref = UNet(_unet_cfg())
    ref.load_state_dict(state, strict=True)
    return ref.eval()


def _one_thread(fn):
    """Runs ``fn`` with one thread, as the runs do (``run.threads=1``), for bit-equal reductions."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return fn()
    finally:
        torch.set_num_threads(n)


def assert_eps_is_the_reference(ref: UNet, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, what: str):
    want = _one_thread(lambda: ref(x, t))
    assert eps.dtype == want.dtype and eps.shape == want.shape, what
    assert torch.equal(eps, want), f"{what}: ε̂ differs from the frozen DDPM in eval mode, max |Δ| " \
                                   f"{(eps - want).abs().max().item():.3e}"


def frozen_in_train_mode(decoder: nn.Module) -> list[str]:
    """Names of frozen modules (and their submodules) whose ``training`` flag is set."""
    return [f"{name}.{sub}".rstrip(".") for name in FROZEN
            for sub, m in decoder.get_submodule(name).named_modules() if m.training]


def trainable_in_train_mode(decoder: nn.Module) -> bool:
    return all(m.training for name in TRAINABLE for m in decoder.get_submodule(name).modules())


def any_in_train_mode(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if m.training]


# ----------------------------------------------------------------------------- recording forwards

@dataclass
class Call:
    run: str            # which train() call ("first", "resumed", "graph"), or "sampling"
    phase: str          # "step" (DeepSpeed's), "graph" (the graph-safe step), "visuals" (the EMA copy),
    #                     or "sampling"
    decoder: ShiftUNet
    x: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    frozen_training: list[str]  # frozen modules in train mode during this forward
    decoder_training: bool
    trainable_training: bool


class Recorder:
    """A global forward hook on every ShiftUNet: inputs, ε̂ and the training flags of each call."""

    def __init__(self):
        self.calls: list[Call] = []
        self.run, self.phase = "idle", "step"
        self._handle = None

    def _hook(self, module, args, out):
        if isinstance(module, ShiftUNet):
            self.calls.append(Call(self.run, self.phase, module, args[0].detach().clone(), args[1].detach().clone(),
                                   out[0].detach().clone(), frozen_in_train_mode(module), module.training,
                                   trainable_in_train_mode(module)))

    def __enter__(self):
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    def select(self, run: str | None = None, phase: str | None = None) -> list[Call]:
        return [c for c in self.calls if run in (None, c.run) and phase in (None, c.phase)]


def _in_phase(rec: Recorder, phase: str, fn):
    def wrapped(*args, **kwargs):
        prev, rec.phase = rec.phase, phase
        try:
            return fn(*args, **kwargs)
        finally:
            rec.phase = prev
    return wrapped


@dataclass
class Runs:
    rec: Recorder
    ref: UNet
    engines: dict          # run name -> the DeepSpeed engine train() built
    ema_copies: list       # (run, decoder copy, its modules in train mode when made), as Visuals made them
    resumed_dir: Path      # the signalled-then-resumed run (its export: EMA weights)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ddpm_export) -> Runs:  # noqa: F811
    """Three tiny DiTi trainings with dropout on, every decoder forward recorded:
    "first" (DeepSpeed's eager step, stopped by a signal after step 2 with a checkpoint), "resumed"
    (the same run relaunched: steps 3-4 from the checkpoint), "graph" (the graph-safe step, 2 steps).
    Visuals every 2 steps make the EMA copy sample inside the runs."""
    import deepspeed
    from diti_fast.engine.graph_step import GraphStep
    from diti_fast.engine.visuals import Visuals

    rec, engines, ema_copies = Recorder(), {}, []
    real_init, real_body = deepspeed.initialize, GraphStep._body
    real_render, real_copy = Visuals.render, Visuals._ema_copy

    def init(*args, **kwargs):
        out = real_init(*args, **kwargs)
        engines[rec.run] = out[0]
        return out

    def ema_copy(self, objective, ema, name):
        clone = real_copy(self, objective, ema, name)
        if name == "decoder":
            ema_copies.append((rec.run, clone, any_in_train_mode(clone)))
        return clone

    common = [f"init.ddpm={ddpm_export}", f"model.unet.dropout={DROPOUT}", "diti.mode=base", "run.device=cpu",
              "log.visuals_every=2", "log.visuals_num=2", "log.visuals_steps=2"]
    root = tmp_path_factory.mktemp("frozen-eval")
    with pytest.MonkeyPatch.context() as mp, rec:
        mp.setattr(deepspeed, "initialize", init)
        mp.setattr(GraphStep, "_body", _in_phase(rec, "graph", real_body))
        mp.setattr(Visuals, "render", _in_phase(rec, "visuals", real_render))
        mp.setattr(Visuals, "_ema_copy", ema_copy)
        rec.run = "first"
        first = train(tiny(root / "run", *common, "run.max_images=16", "debug.signal_at_step=2"))
        assert first.status == "signal" and first.step == 2 and first.last_checkpoint is not None
        rec.run = "resumed"
        resumed = train(tiny(root / "run", *common, "run.max_images=16"))
        assert resumed.status == "done" and resumed.step == 4
        rec.run = "graph"
        graph = train(tiny(root / "graph", *common, "run.max_images=8", "fast.cuda_graph=true"))
        assert graph.status == "done" and graph.step == 2
    return Runs(rec, reference_ddpm(ddpm_export), engines, ema_copies, root / "run")


def _check_training_forwards(runs: Runs, run: str, phase: str, steps: int):
    calls = runs.rec.select(run, phase)
    assert len(calls) == steps, f"{run}/{phase}: {len(calls)} decoder forwards, expected {steps} (base mode)"
    for i, c in enumerate(calls):
        what = f"{run}/{phase} forward {i + 1}"
        # the decoder really trains (dropout on in the shift branch) ...
        assert c.decoder_training and c.trainable_training, what
        # ... while the frozen DDPM runs in eval mode, and its ε̂ is the DDPM's eval-mode output
        assert c.frozen_training == [], f"{what}: frozen modules in train mode: {c.frozen_training[:5]}"
        assert_eps_is_the_reference(runs.ref, c.x, c.t, c.eps, what)


# ----------------------------------------------------------------------------- tests

def test_shift_unet_train_keeps_the_frozen_ddpm_in_eval_mode(tmp_path, ddpm_export):  # noqa: F811
    from diti_fast.engine.objective import load_frozen_ddpm

    torch.manual_seed(0)
    decoder = ShiftUNet(_unet_cfg())
    load_frozen_ddpm(decoder, tiny(tmp_path, f"init.ddpm={ddpm_export}", f"model.unet.dropout={DROPOUT}"))
    parent = nn.ModuleDict({"decoder": decoder})  # as Objective holds it: train() recurses through it
    for toggle in (lambda: decoder.train(), lambda: decoder.train(True), lambda: (decoder.eval(), decoder.train()),
                   lambda: parent.train(), lambda: (parent.eval(), parent.train(True))):
        toggle()
        assert decoder.training and trainable_in_train_mode(decoder)
        assert frozen_in_train_mode(decoder) == []
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=g)
    t = torch.tensor([0, 250, 600, 999])
    cond = torch.randn(4, decoder.cfg.latent_dim, generator=g)
    ref = reference_ddpm(ddpm_export)
    eps, _ = _one_thread(lambda: decoder(x, t, cond))
    assert_eps_is_the_reference(ref, x, t, eps, "ShiftUNet in train mode")
    # The comparison can see dropout: the same reference in train mode gives another ε̂.
    ref.train()
    torch.manual_seed(2)
    noisy = _one_thread(lambda: ref(x, t))
    ref.eval()
    assert not torch.equal(noisy, eps), "dropout does not change ε̂: the test could not see it"
    decoder.eval()
    assert any_in_train_mode(decoder) == []


def test_deepspeeds_step_runs_the_frozen_ddpm_in_eval_mode(runs):
    _check_training_forwards(runs, "first", "step", steps=2)


def test_a_resumed_run_runs_the_frozen_ddpm_in_eval_mode(runs):
    # the relaunch resumed (2 more steps, not 4) with the frozen DDPM taken from the checkpoint
    _check_training_forwards(runs, "resumed", "step", steps=2)


def test_the_graph_safe_step_runs_the_frozen_ddpm_in_eval_mode(runs):
    _check_training_forwards(runs, "graph", "graph", steps=2)
    assert runs.rec.select("graph", "step") == []  # every step went through the graph-safe step


def test_the_deepspeed_engine_keeps_the_frozen_ddpm_in_eval_mode(runs):
    assert set(runs.engines) == {"first", "resumed", "graph"}
    for run, engine in runs.engines.items():
        decoder = engine.module.decoder
        # as train() left it: the decoder training, its frozen DDPM in eval mode
        assert decoder.training and trainable_in_train_mode(decoder), run
        assert frozen_in_train_mode(decoder) == [], run
        engine.eval()
        assert any_in_train_mode(engine.module) == [], run
        engine.train()
        assert decoder.training and trainable_in_train_mode(decoder), run
        left = frozen_in_train_mode(decoder)
        assert left == [], f"{run}: after engine.train(): {left[:5]}"


def test_the_ema_copy_runs_the_frozen_ddpm_in_eval_mode(runs):
    copies = runs.ema_copies
    assert [r for r, _, _ in copies] == ["first", "resumed", "graph"]  # visuals at steps 2, 4, 2
    for run, clone, training_at_copy in copies:
        assert training_at_copy == [], f"{run}: EMA copy made in train mode: {training_at_copy[:5]}"
    # its forwards while sampling the visuals (masked DDIM inversion and decoding)
    calls = runs.rec.select(phase="visuals")
    assert {id(c.decoder) for c in calls} == {id(clone) for _, clone, _ in copies}
    for i, c in enumerate(calls):
        assert not c.decoder_training and c.frozen_training == [], f"visuals forward {i}"
        assert_eps_is_the_reference(runs.ref, c.x, c.t, c.eps, f"EMA copy ({c.run}), visuals forward {i}")
    # the copy put in train mode (fine-tuning it, say) keeps its frozen DDPM in eval mode
    run, clone, _ = copies[-1]
    clone.train()
    assert frozen_in_train_mode(clone) == [], f"{run}: {frozen_in_train_mode(clone)[:5]}"
    c = calls[-1]
    eps, _ = _one_thread(lambda: clone(c.x, c.t, torch.zeros(len(c.x), clone.cfg.latent_dim)))
    assert_eps_is_the_reference(runs.ref, c.x, c.t, eps, "EMA copy in train mode")


def test_the_exported_model_for_eval_and_sampling_runs_the_frozen_ddpm_in_eval_mode(runs):
    from diti_fast.diffusion import make_schedule
    from diti_fast.eval.features import load_run
    from diti_fast.eval.sample import ddpm_samples
    from diti_fast.masks import TimestepMasks
    from diti_fast.sampling import ddim_sample, masked_ddim

    ex = load_run(runs.resumed_dir)
    assert any_in_train_mode(ex.decoder) == [] and any_in_train_mode(ex.encoder) == []
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 3, 32, 32, generator=g)
    t = torch.tensor([5, 400, 999])
    z = _one_thread(lambda: ex.encoder(x))
    eps, _ = _one_thread(lambda: ex.decoder(x, t, z))
    assert_eps_is_the_reference(runs.ref, x, t, eps, "export, eval mode")

    # masked DDIM (reconstruction, counterfactuals) on a decoder left in train mode
    ex.decoder.train()
    assert frozen_in_train_mode(ex.decoder) == []
    sched = make_schedule(ex.model_cfg.diffusion, "cpu")
    m = ex.model_cfg
    masks = TimestepMasks.build(m.masks, m.unet.latent_dim, m.diffusion.timesteps, "cpu")
    rec = Recorder()
    rec.run = rec.phase = "sampling"
    with rec:
        _one_thread(lambda: masked_ddim(ex.decoder, x, z, sched, masks, steps=2, inverse=True))
    assert len(rec.calls) == 2
    for i, c in enumerate(rec.calls):
        assert not c.decoder_training and c.frozen_training == [], f"masked DDIM forward {i}"
        assert_eps_is_the_reference(runs.ref, c.x, c.t, c.eps, f"export, masked DDIM forward {i}")
    assert ex.decoder.training and frozen_in_train_mode(ex.decoder) == []  # train mode given back as found
    eps, _ = _one_thread(lambda: ex.decoder(x, t, z))
    assert_eps_is_the_reference(runs.ref, x, t, eps, "export, train mode")

    # the plain DDPM sampler over the decoder's frozen path: the reference's samples, bit for bit
    ex.decoder.eval()
    got = _one_thread(lambda: ddpm_samples(ex, 2, steps=3, seed=4))
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator(device="cpu").manual_seed(4))
    want = _one_thread(lambda: ddim_sample(runs.ref, noise, sched, 3))
    assert torch.equal(got, want)
    # it hands the decoder back in the mode it found it: eval, the shift branch included
    assert any_in_train_mode(ex.decoder) == [], any_in_train_mode(ex.decoder)[:5]
    eps, _ = _one_thread(lambda: ex.decoder(x, t, z))
    assert_eps_is_the_reference(runs.ref, x, t, eps, "export after DDPM sampling")
