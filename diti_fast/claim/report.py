"""The claim's report: plots (stage shares, the effect I with intervals, losses with and without z)
and claim.md, every sentence of which is read off claim.json."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    # lazy: matplotlib is slow to import, and its backend must be chosen before pyplot loads
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plots(result: dict, work: Path, out: Path) -> None:
    plt = _plt()
    ss, names = result["stage_share"], result["factor_names"]
    order = np.argsort(ss["lost_t"])
    arms = list(ss["shares"])
    # 1. stage-share heatmaps, factors ordered by where they are lost
    fig, axes = plt.subplots(1, len(arms), figsize=(3.2 * len(arms), 3.6), squeeze=False)
    for ax, a in zip(axes[0], arms):
        p = np.mean(ss["shares"][a], 0)[order]
        ax.imshow(p, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(a)
        ax.set_xticks(range(p.shape[1]), [f"stage {s + 1}" for s in range(p.shape[1])])
        ax.set_yticks(range(len(order)), [f"{names[i]} ({ss['lost_t'][i]:.0f})" for i in order])
        for (r, c), v in np.ndenumerate(p):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.5 else "k", fontsize=7)
    fig.suptitle("stage share P(f, s), mean over seeds; factors by exact-Bayes lost t (median)")
    fig.tight_layout()
    fig.savefig(out / "stage_share.png", dpi=110)
    plt.close(fig)
    # 2. the effect I with intervals, per seed and pooled, and the Spearman intervals
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    y = 0
    labels = []
    for a, i in ss["I"].items():
        for k, s in enumerate(i["per_seed"] + [i["pooled"]]):
            lo, hi = s["ci"]
            a1.errorbar(s["point"], y, xerr=[[s["point"] - lo], [hi - s["point"]]], fmt="o", capsize=3,
                        color="C0" if k < len(i["per_seed"]) else "C3")
            labels.append(f"{a} {'seed %d' % k if k < len(i['per_seed']) else 'pooled'}")
            y += 1
    a1.axvline(0, color="k", lw=0.8)
    a1.axvline(0.3, color="C3", lw=0.8, ls="--")
    a1.set_yticks(range(len(labels)), labels)
    a1.set_xlabel("I = C(DiTi arm) − C(PDAE), stages (95% interval)")
    for k, (a, r) in enumerate(ss["spearman"].items()):
        lo, hi = r["ci"]
        pt = r["point"] if r["point"] == r["point"] else 0.0
        a2.errorbar(pt, k, xerr=[[pt - lo], [hi - pt]], fmt="o", capsize=3)
    a2.axvline(0, color="k", lw=0.8)
    a2.set_yticks(range(len(ss["spearman"])), list(ss["spearman"]))
    a2.set_xlabel("Spearman(lost t, c_f) (95% interval)")
    fig.tight_layout()
    fig.savefig(out / "effect.png", dpi=110)
    plt.close(fig)
    # 3. held-out loss per t-bucket: own z, shuffled z, the DDPM alone
    runs = result["measured"]
    fig, axes = plt.subplots(1, len(runs), figsize=(2.6 * len(runs), 2.8), squeeze=False, sharey=True)
    for ax, (name, m) in zip(axes[0], runs.items()):
        for key, style in (("own", "-"), ("shuffled", "--"), ("stage1_shuffled", ":"), ("ddpm_only", "-.")):
            ax.plot(np.arange(len(m["losses"][key]["buckets"])) * 100 + 50, m["losses"][key]["buckets"], style,
                    label=key)
        ax.set_title(f"{name}\n+{m['losses']['shuffle_increase']:.0%} shuffled", fontsize=8)
        ax.set_xlabel("t")
    axes[0][0].set_ylabel("weighted loss")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=110)
    plt.close(fig)
    # 4. the DDPM against the exact posterior-mean denoiser
    g = result["ddpm_gate"]["denoiser"]
    fig, ax = plt.subplots(figsize=(4.5, 3))
    mid = np.array(g["bucket_edges"][:-1]) + 50
    ax.semilogy(mid, g["ddpm"], "o-", label="DDPM")
    ax.semilogy(mid, g["bayes"], "s-", label="exact posterior mean")
    ax.set_xlabel("t")
    ax.set_ylabel("ε-MSE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ddpm_vs_bayes.png", dpi=110)
    plt.close(fig)


def _ci(x) -> str:
    return f"[{x[0]:+.3f}, {x[1]:+.3f}]"


def write_markdown(result: dict, path: Path) -> None:
    ss, names, gates = result["stage_share"], result["factor_names"], result["gates"]
    L = ["# The claim: does DiTi order factors by the noise level that destroys them?", "",
         f"**Verdict ({result['primary_arm']} vs pdae): {result['verdict']}.** "
         f"{result['verdicts'][result['primary_arm']]['why']}.", "",
         f"Command `{result['command']}`, commit `{result['git']['commit'][:12]}`"
         f"{' (dirty tree)' if result['git']['dirty'] else ' (clean tree)'}, "
         f"{result['timings_s']['total'] / 60:.1f} min, load average {result['load_average_start'][0]:.2f} at the "
         f"start and {result['load_average_end'][0]:.2f} at the end.", "",
         "## The design (exact Bayes, the engine's schedule)", "",
         "| factor | scale | ‖Δ‖ | lost t p10 / p50 / p90 | stage lost |", "|---|---|---|---|---|"]
    for n in names:
        r = result["design"]["factors"][n]
        L.append(f"| {n} | {r['scale']} | {r['delta_l2_median']:.2f} | {r['lost_t_p10']:.0f} / {r['lost_t_p50']:.0f} / "
                 f"{r['lost_t_p90']:.0f} | {r['lost_stage']} |")
    c = result["probe"]["chosen"]
    L += ["", f"Training path (measured at the start): {c['precision']}, channels_last={c['channels_last']}, "
          f"compile={c['compile']}.", ""]
    if result["probe"]["candidates"]:
        L += ["| candidate | images/s | setup s | loss vs fp32 |", "|---|---|---|---|"]
        for r in result["probe"]["candidates"]:
            L.append(f"| {r['precision']}{' +channels_last' if r['channels_last'] else ''}"
                     f"{' +compile' if r['compile'] else ''} | {r['images_per_s']:.0f} | {r['setup_s']:.1f} | "
                     f"{r['loss_rel_diff']:.1e} |")
    L += ["", f"DDPM: {result['ddpm']['images']} images ({result['ddpm']['steps']} steps).", "",
          "## Gates", "", "| gate | rule | result |", "|---|---|---|"]
    for k, g in gates.items():
        val = {"ddpm_denoiser": lambda: ", ".join(f"{e:.4f}" for e in g["excess"]),
               "ddpm_samples": lambda: f"{g['valid_fraction']:.2f} valid",
               "z_used": lambda: ", ".join(f"{n} +{v:.1%}" for n, v in g["increase"].items()),
               "factors_in_z": lambda: "lowest: " + ", ".join(
                   f"{n} {min(v, key=v.get)} {min(v.values()):.4f}" for n, v in g["sensitivity"].items())}[k]()
        L.append(f"| {k} | {g['rule']} | {'pass' if g['pass'] else '**fail**'}: {val} |")
    arms_len = next(iter(result["arms"].values()))
    L += ["", f"Arm runs: {len(result['arms'])} ({', '.join(result['arms'])}), "
          f"{arms_len['images']} images each.", "",
          "## Primary metric: interventional stage share", "",
          f"Fine (lost in stage 1): {', '.join(names[i] for i in ss['fine'])}; coarse (lost in stage 3): "
          f"{', '.join(names[i] for i in ss['coarse'])}. {ss['n_images']} test images, {ss['resamples']} paired "
          "bootstrap resamples.", "", "| arm | seed | I | 95% interval |", "|---|---|---|---|"]
    for a, i in ss["I"].items():
        for k, s in enumerate(i["per_seed"]):
            L.append(f"| {a} | {k} | {s['point']:+.3f} | {_ci(s['ci'])} |")
        L.append(f"| {a} | pooled | **{i['pooled']['point']:+.3f}** | {_ci(i['pooled']['ci'])} |")
    L += ["", "| arm | contrast C (coarse − fine centre) per seed | Spearman(lost t, c_f) | 95% interval |",
          "|---|---|---|---|"]
    for a in ss["spearman"]:
        L.append(f"| {a} | {', '.join(f'{x:+.3f}' for x in ss['contrast'][a]['per_seed'])} | "
                 f"{ss['spearman'][a]['point']:+.3f} | {_ci(ss['spearman'][a]['ci'])} |")
    L += ["", "Centres c_f (stage 1 = early t … 3 = late t), mean over seeds:", "",
          "| factor | lost t | " + " | ".join(ss["centres"]) + " |", "|---|---|" + "---|" * len(ss["centres"])]
    for i in np.argsort(ss["lost_t"]):
        L.append(f"| {names[i]} | {ss['lost_t'][i]:.0f} | " + " | ".join(f"{ss['centres'][a][i]:.2f}"
                                                                       for a in ss["centres"]) + " |")
    L += ["", "## The rule, condition by condition", ""]
    for a, v in result["verdicts"].items():
        L.append(f"- **{a}: {v['verdict']}** ({v['why']})")
        for k, ok in v["checks"].items():
            L.append(f"  - {k}: {'yes' if ok else 'no'}")
        x = ss.get("crossover", {}).get(a)
        if x:
            L.append(f"  - crossover (stripes vs brightness, DiTi − PDAE): {x['point']:+.3f} {_ci(x['ci'])}: "
                     f"the order follows {result['order_follows'][a]}")
    L += ["", "Sensitivity E‖z(x) − z(x^f)‖² / E‖z(x) − z(y)‖² (gate 3), mean over seeds:", "",
          "| factor | " + " | ".join(ss["centres"]) + " |", "|---|" + "---|" * len(ss["centres"])]
    sens = gates["factors_in_z"]["sensitivity"]
    for n in names:
        L.append(f"| {n} | " + " | ".join(
            f"{np.mean([v[n] for k, v in sens.items() if k.startswith(a + '-s')]):.4f}" for a in ss["centres"]) + " |")
    L += ["", "## Secondary", "", "Held-out weighted loss (own z / z shuffled / stage 1 shuffled / stage 2 / stage 3 "
          "/ DDPM alone):", ""]
    for n, m in result["measured"].items():
        lo = m["losses"]
        L.append(f"- {n}: {lo['own']['loss']:.5f} / {lo['shuffled']['loss']:.5f} / {lo['stage1_shuffled']['loss']:.5f} / "
                 f"{lo['stage2_shuffled']['loss']:.5f} / {lo['stage3_shuffled']['loss']:.5f} / {lo['ddpm_only']['loss']:.5f}")
    L += ["", "First-stage probe skill minus random-dims skill, per factor (mean over seeds):", "",
          "| factor | " + " | ".join(result["stage_share"]["centres"]) + " |",
          "|---|" + "---|" * len(result["stage_share"]["centres"])]
    for n in names:
        row = []
        for a in result["stage_share"]["centres"]:
            vals = [m["probes"][n]["first_minus_random"] for k, m in result["measured"].items() if k.startswith(a + "-s")]
            row.append(f"{np.mean(vals):+.2f}")
        L.append(f"| {n} | " + " | ".join(row) + " |")
    L += ["", "Plots: `stage_share.png`, `effect.png`, `losses.png`, `ddpm_vs_bayes.png`, `ddpm_samples.png`.", ""]
    path.write_text("\n".join(L), encoding="utf-8")
