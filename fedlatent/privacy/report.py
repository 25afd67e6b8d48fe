"""The privacy section of a run's report (privacy.md, and the "## Privacy" section of report.md)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

BEGIN, END = "<!-- privacy:begin -->", "<!-- privacy:end -->"

DP_SCOPE = (
    "Client-side DP-SGD (Opacus): each client's uploaded parameters are (ε_c, δ)-DP with respect to adding or "
    "removing one of that client's training examples, composed over every round the client was scheduled in; "
    "aggregates, distilled / pseudo sets and the global model inherit it by post-processing, and the whole run is "
    "(max_c ε_c, δ)-DP for any single example. Not covered: the sample counts and training losses clients report, "
    "whether a client took part (this is not user-level DP), the public split and the test set."
)


def _f(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec)


def privacy_markdown(r: Mapping[str, Any]) -> str:
    """The privacy section (markdown) of an audit report dict (see :func:`fedlatent.privacy.audit.audit_run`)."""
    lines = ["## Privacy", "",
             f"Audit of `{r['run']}` ({r['method']}, {r['dataset']}, α {r['alpha']}, {r['clients']} clients, seed "
             f"{r['seed']}); members and partition reconstructed from config.json and verified against partition.csv "
             f"({r['members_total']} client training images; {r['heldout_reference']} held-out test images as "
             f"non-member reference, the other {r['extractor_public']} test images are the feature extractor's "
             "public training data).", ""]
    mia = r.get("mia") or {}
    if mia:
        lines += [f"### Membership inference on the final global model ({mia['members']} members vs "
                  f"{mia['non_members']} non-members)", "",
                  "| attack | AUC | TPR at 1 % FPR |", "|---|---:|---:|"]
        names = {"loss": "loss threshold", "confidence": "confidence threshold",
                 "lira": "LiRA-style ({} shadows, global variance)"}
        for k, v in mia["attacks"].items():
            label = names.get(k, k).format(v.get("shadows"))
            lines.append(f"| {label} | {_f(v['auc'])} | {_f(v['tpr_at_1fpr'])} |")
        lines += ["", "AUC 0.5 and TPR 0.01 at 1 % FPR are chance.", ""]
    mem = r.get("memorisation")
    if mem:
        lines += [f"### Memorisation by the synthetic set (`{mem['file']}`, {mem['n_synthetic']} images)", "",
                  "ratio = distance to the nearest client image / distance to the nearest held-out image of the same "
                  "class; control = the same ratio for real test images no client saw (what a set that does not "
                  "memorise should match; below 1 because the client pool is larger).", "",
                  "| space | median ratio (control) | 5 % / 25 % / 75 % | min | ratio < 1 | ratio < 0.5 | near-copies |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for space in ("pixel", "feature"):
            s = mem.get(space)
            if s:
                lines.append(f"| {space} | {_f(s['ratio_median'])} ({_f(s['control_ratio_median'])}) | "
                             f"{_f(s['ratio_p05'], '.2f')} / "
                             f"{_f(s['ratio_p25'], '.2f')} / {_f(s['ratio_p75'], '.2f')} | {_f(s['ratio_min'])} | "
                             f"{_f(100 * s['frac_ratio_below_1'], '.1f')} % | {_f(100 * s['frac_ratio_below_0.5'], '.1f')} % "
                             f"| {s['flagged']} |")
        lines += ["", f"Near-copies (closer to a client image than {100 * (1 - mem['copy_quantile']):.0f} % of "
                  f"held-out images of the class are, in either space): **{mem['near_copies']}** (a set that copies "
                  f"nothing gets about {100 * mem['copy_quantile']:.0f}-{200 * mem['copy_quantile']:.0f} % of its images "
                  f"flagged by chance, up to {2 * mem['copy_quantile'] * mem['n_synthetic']:.1f} here; look at the pairs)"
                  + (f" (synthetic images {mem['flagged_images'][:20]})" if mem["near_copies"] else "")
                  + ". Closest pairs: `closest_pairs.png`.", ""]
    elif "memorisation" in r:
        lines += ["No synthetic set in this run (memorisation audit not applicable).", ""]
    dp = r.get("dp")
    if dp:
        eps = dp["epsilon_per_client"]
        lines += ["### Differential privacy", "",
                  f"DP-SGD with clip {dp['clip']}, "
                  + (f"noise multiplier {dp['noise_multiplier']}" if dp["noise_multiplier"] is not None
                     else f"target ε {dp['target_epsilon']} per client (σ calibrated per client, max {_f(dp['sigma_max'], '.3f')})")
                  + (f", δ {dp['delta']}: ε spent per client (RDP accountant) max **{_f(dp['epsilon_max'], '.3f')}**; "
                     + ", ".join(f"c{c} {_f(e, '.2f')}" for c, e in sorted(eps.items())) + "." if eps else
                     f", δ {dp['delta']}: no client has trained yet (ε = 0)."), "", DP_SCOPE, ""]
    else:
        lines += ["No differential privacy in this run (`--dp` off): the uploads carry no formal guarantee.", ""]
    return "\n".join(lines).rstrip()


def update_report(path: str | os.PathLike, section: str) -> Path:
    """Put ``section`` into report.md between markers (replacing an earlier audit); creates report.md if absent."""
    from ..utils import atomic_write_text

    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    block = f"{BEGIN}\n{section}\n{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + block + tail
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + block
    atomic_write_text(path, text)
    return path


__all__ = ["privacy_markdown", "update_report", "DP_SCOPE"]
