"""``diti-fast doctor`` (= ``python -m diti_fast.selfcheck``): is this installation ready to train?

Prints the versions of the packages the engine uses, the CUDA device, whether the Triton kernels
compile and agree with their references on that device, whether the fused Adam the engine steps
with (``torch.optim.Adam(fused=True)``) runs there, and whether DeepSpeed's own FusedAdam op loads.
Run it on a cluster node before launching many GPUs. On a machine without CUDA the GPU checks say
so and are skipped; the exit status is 0 unless a check that could run failed.

    diti-fast doctor            # or: python -m diti_fast.selfcheck [--json] [--skip-deepspeed-op]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version

from diti_fast import kernels as K

OK, SKIP, FAIL = "ok", "skipped", "FAILED"

# Package -> import name; the first group is required by the engine, the rest are extras.
REQUIRED = {"torch": "torch", "triton": "triton", "deepspeed": "deepspeed", "webdataset": "webdataset",
            "numpy": "numpy", "safetensors": "safetensors", "pyyaml": "yaml"}
OPTIONAL = {"xformers": "xformers", "lmdb": "lmdb", "tensorboard": "tensorboard"}


def _version(import_name: str) -> str | None:
    dist = {"yaml": "pyyaml"}.get(import_name, import_name)
    try:
        return version(dist)
    except PackageNotFoundError:
        pass
    try:
        mod = importlib.import_module(import_name)
    except Exception:
        return None
    return getattr(mod, "__version__", "installed")


def versions() -> dict:
    out = {"python": platform.python_version(), "diti-fast": _version("diti-fast") or "not installed (source tree)"}
    for name, mod in {**REQUIRED, **OPTIONAL}.items():
        out[name] = _version(mod) or ("MISSING" if name in REQUIRED else "not installed")
    return out


def cuda_device() -> dict:
    import torch  # lazy: so that doctor lists the versions, a missing torch included, before loading it
    info = {"torch_cuda": torch.version.cuda, "available": torch.cuda.is_available()}
    if info["available"]:
        i = torch.cuda.current_device()
        p = torch.cuda.get_device_properties(i)
        info.update(count=torch.cuda.device_count(), name=p.name, capability=f"{p.major}.{p.minor}",
                    memory_gib=round(p.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    return info


def _result(status: str, detail: str) -> dict:
    return {"status": status, "detail": detail}


def check_triton_kernels() -> dict:
    """Compile and run both fused kernels on a small input; compare with their eager references."""
    import torch  # lazy: as in cuda_device
    if not torch.cuda.is_available():
        return _result(SKIP, "no CUDA device: Triton compiles for GPUs (the test suite runs the kernels "
                             "interpreted on a CPU, TRITON_INTERPRET=1)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _result(SKIP, "TRITON_INTERPRET=1 is set: the kernels would run interpreted, not compiled")
    try:
        dev = torch.device("cuda")
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(2, 64, 8, 8, device=dev, generator=g)
        w, b = torch.randn(64, device=dev, generator=g), torch.randn(64, device=dev, generator=g)
        got = K.adaptive_group_norm(x, 32, w, b)
        ref = K.adaptive_group_norm_ref(x, 32, w, b)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        eps, pred = torch.randn(4, 3, 8, 8, device=dev, generator=g), torch.randn(4, 3, 8, 8, device=dev, generator=g)
        t = torch.tensor([0, 250, 500, 999], device=dev)
        torch.testing.assert_close(K.ddpm_loss(eps, pred, t)[0], K.ddpm_loss_ref(eps, pred, t)[0],
                                   rtol=1e-4, atol=1e-5)
        torch.cuda.synchronize()
    except Exception as e:
        return _result(FAIL, f"{type(e).__name__}: {e}".strip()[:800])
    import triton  # lazy: Linux only (the triton requirement's platform marker)
    return _result(OK, f"adaptive_group_norm and ddpm_loss compiled with Triton {triton.__version__} and "
                       "agree with their references")


def check_engine_adam() -> dict:
    """One step of the optimiser the engine uses, against the unfused Adam."""
    import torch  # lazy: as in cuda_device
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        p1 = torch.nn.Parameter(torch.linspace(-1, 1, 64, device=dev))
        p2 = torch.nn.Parameter(p1.detach().clone())
        for p, fused in ((p1, True), (p2, False)):
            opt = torch.optim.Adam([p], lr=1e-3, fused=fused) if fused else torch.optim.Adam([p], lr=1e-3, foreach=False)
            p.grad = torch.cos(torch.arange(64, device=dev, dtype=torch.float32))
            opt.step()
        torch.testing.assert_close(p1, p2)
    except Exception as e:
        return _result(FAIL, f"torch.optim.Adam(fused=True) on {dev}: {type(e).__name__}: {e}"[:800])
    return _result(OK, f"torch.optim.Adam(fused=True) steps on {dev} like the unfused Adam")


def check_deepspeed_fused_adam(skip: bool = False) -> dict:
    """DeepSpeed's FusedAdam op (a CUDA extension, prebuilt or JIT-compiled on first use). The engine
    steps with torch's fused Adam; this shows DeepSpeed's CUDA op build works on the node."""
    if skip:
        return _result(SKIP, "--skip-deepspeed-op")
    import torch  # lazy: as in cuda_device
    try:
        # lazy: a DeepSpeed that fails to import is this check's FAIL, not doctor's crash
        import deepspeed  # noqa: F401
        from deepspeed.ops.op_builder import FusedAdamBuilder
    except Exception as e:
        return _result(FAIL, f"cannot import deepspeed: {type(e).__name__}: {e}"[:800])
    if not torch.cuda.is_available():
        return _result(SKIP, "no CUDA device: DeepSpeed's FusedAdam is a CUDA op (the engine's optimiser "
                             "is torch's fused Adam, checked above)")
    try:
        builder = FusedAdamBuilder()
        if not builder.is_compatible(verbose=False):
            return _result(FAIL, "DeepSpeed reports FusedAdam as not compatible with this torch/CUDA")
        builder.load(verbose=False)
        from deepspeed.ops.adam import FusedAdam  # lazy: as above, inside the check's try
        p = torch.nn.Parameter(torch.ones(8, device="cuda"))
        p.grad = torch.ones_like(p)
        FusedAdam([p], lr=1e-3).step()
        torch.cuda.synchronize()
    except Exception as e:
        return _result(FAIL, f"{type(e).__name__}: {e}"[:800])
    return _result(OK, "deepspeed.ops.adam.FusedAdam loaded and stepped")


def run(skip_deepspeed_op: bool = False) -> dict:
    report = {"versions": versions()}
    for name, fn in (("cuda", cuda_device),):
        try:
            report[name] = fn()
        except Exception as e:  # a broken torch install: report it, do not crash
            report[name] = {"available": False, "error": f"{type(e).__name__}: {e}"}
    checks = {}
    for name, fn in (("triton_kernels", check_triton_kernels), ("engine_fused_adam", check_engine_adam),
                     ("deepspeed_fused_adam", lambda: check_deepspeed_fused_adam(skip_deepspeed_op))):
        try:
            checks[name] = fn()
        except Exception as e:
            checks[name] = _result(FAIL, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=2)}"[:800])
    report["checks"] = checks
    missing = [k for k in REQUIRED if report["versions"].get(k) == "MISSING"]
    report["ok"] = not missing and all(c["status"] != FAIL for c in checks.values())
    report["missing"] = missing
    return report


def format_report(r: dict) -> str:
    lines = ["diti-fast self-check", "versions:"]
    lines += [f"  {k:<12} {v}" for k, v in r["versions"].items()]
    c = r["cuda"]
    if c.get("available"):
        lines.append(f"CUDA device: {c['name']} (compute {c['capability']}, {c['memory_gib']} GiB, "
                     f"{c['count']} visible, bf16 {'yes' if c['bf16'] else 'no'}), torch built for CUDA {c['torch_cuda']}")
    else:
        lines.append(f"CUDA device: none (torch built for CUDA {c.get('torch_cuda') or 'no: a CPU build'})"
                     + (f"; {c['error']}" if c.get("error") else ""))
    names = {"triton_kernels": "Triton kernels compile", "engine_fused_adam": "engine's fused Adam",
             "deepspeed_fused_adam": "DeepSpeed FusedAdam op"}
    for k, v in r["checks"].items():
        lines.append(f"{names[k]:<24} {v['status']}: {v['detail']}")
    if r["missing"]:
        lines.append(f"missing required packages: {', '.join(r['missing'])}")
    if not r["ok"]:
        lines.append("result: NOT ready (see FAILED / missing above)")
    elif c.get("available"):
        lines.append("result: ready")
    else:
        lines.append("result: ready for CPU runs (no CUDA device: the GPU checks were skipped)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="diti-fast doctor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--skip-deepspeed-op", action="store_true",
                    help="do not build/load DeepSpeed's FusedAdam (its first JIT build takes minutes)")
    args = ap.parse_args(argv)
    r = run(args.skip_deepspeed_op)
    print(json.dumps(r, indent=1) if args.json else format_report(r))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
