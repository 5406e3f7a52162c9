"""The claim experiment (``make claim``): does DiTi write the factors that diffusion destroys early into
the latent dims that early time-steps unlock, where the PDAE baseline shows no such order?

16-px data whose factors die at designed noise levels -> a DDPM gated against the exact posterior-mean
denoiser -> DiTi base, DiTi stop_grad and PDAE, two seeds each, on that one frozen DDPM -> the
interventional stage share with paired bootstrap intervals -> a verdict under a rule fixed in code.

Modules: ``plan`` (sizes and thresholds), ``bayes`` (exact posterior on the design), ``speed`` (the
fastest CPU path), ``pipeline`` (the resumable phases), ``measure`` (what is measured on trained
models), ``stage_share`` (the metric and the decision rule), ``report`` (plots, markdown),
``__main__`` (the command).
"""
