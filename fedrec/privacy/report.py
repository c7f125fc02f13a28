"""results.json of `fedrec privacy run` -> table.md and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path

NAMES = {"mgradinv": "MGradInv", "random": "random guess", "sign_split": "sign split (self-resolved sign)",
         "sign_split_oracle": "sign split (oracle sign)", "intersection": "id intersection",
         "imia": "IMIA-style selection"}



def _save(fig, path):
    """Lay out, write (110 dpi) and close a figure; returns the file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name

def _cell(s: dict, key: str) -> str:
    if key not in s:
        return "-"
    return f"{s[key]:.3f} ± {s[key + '_std']:.3f}"


def _method_rows(per_method: dict) -> list:
    rows = []
    for m, per_k in per_method.items():
        for k, s in sorted(per_k.items(), key=lambda kv: int(kv[0])):
            rows.append(f"| {NAMES.get(m, m)} | {k} | {_cell(s, 'f1')} | {_cell(s, 'f1@0.5')} | "
                        f"{_cell(s, 'auc')} | {_cell(s, 'user_cos')} | {_cell(s, 'f1_signfree')} | "
                        f"{_cell(s, 'user_cos_abs')} | {s['n']} |")
    return rows


HEAD = ["| method | k | F1 (top-\\|P\\|) | F1 (x>0.5) | AUC | user cos | F1 up to sign | "
        "\\|user cos\\| | targets |", "|---|---|---|---|---|---|---|---|---|"]


def tables(result: dict) -> str:
    sw = result["sweeps"]
    cfg = result["config"]
    lines = [f"# MGradInv on {cfg['data']['dataset']}, {cfg['model']['name']}"
             f" ({cfg['model'].get('ncf_form', '')}), loss {cfg['model']['loss']}, "
             f"negatives {cfg['data']['negatives']}", "",
             f"Final model: test HR@10 = {result['final'].get('test_hr@10', float('nan')):.4f} "
             f"after {cfg['train']['rounds']} rounds.", "",
             f"Simulator exactness (true private data -> observed upload, relative L2 over "
             f"{result['exactness']['uploads']} recorded uploads): max "
             f"{result['exactness']['max']:.2e}, median {result['exactness']['median']:.2e}.", ""]
    early = result["privacy"]["early"]
    lines += [f"## Early in training (t1 = {early:g} of the rounds), every method", ""] + HEAD
    lines += _method_rows(sw["k"])
    lines += ["", "## Training progress (t1 as a fraction of the rounds)", "",
              "| t1 | method | k | F1 | AUC | user cos | F1 up to sign |",
              "|---|---|---|---|---|---|---|"]
    for p, per in sorted(sw["progress"].items(), key=lambda kv: float(kv[0])):
        for m in ("mgradinv", "sign_split", "sign_split_oracle", "imia", "random"):
            for k, s in sorted(per.get(m, {}).items(), key=lambda kv: int(kv[0])):
                lines.append(f"| {float(p):g} | {NAMES[m]} | {k} | {_cell(s, 'f1')} | "
                             f"{_cell(s, 'auc')} | {_cell(s, 'user_cos')} | "
                             f"{_cell(s, 'f1_signfree')} |")
    lines += ["", "## Interval between the observed rounds (t1 early)", "",
              "| interval | method | k | F1 | AUC | user cos |", "|---|---|---|---|---|---|"]
    for d, per in sorted(sw["interval"].items(), key=lambda kv: int(kv[0])):
        for m in ("mgradinv", "intersection", "random"):
            for k, s in sorted(per.get(m, {}).items(), key=lambda kv: int(kv[0])):
                if m != "mgradinv" and int(k) > 2:
                    continue
                lines.append(f"| {d} | {NAMES[m]} | {k} | {_cell(s, 'f1')} | "
                             f"{_cell(s, 'auc')} | {_cell(s, 'user_cos')} |")
    cms = result.get("countermeasures") or []
    if len(cms) > 1:
        lines += ["", "## Countermeasures (attack at the early point)", "",
                  "| countermeasure | test HR@10 | k | F1 | AUC | user cos | random F1 |",
                  "|---|---|---|---|---|---|---|"]
        for c in cms:
            rnd = c.get("random", {}).get(1, c.get("random", {}).get("1", {}))
            for k, s in sorted(c["attack"].items(), key=lambda kv: int(kv[0])):
                lines.append(f"| {c['label']} | {c['final'].get('test_hr@10', float('nan')):.4f} | "
                             f"{k} | {_cell(s, 'f1')} | {_cell(s, 'auc')} | "
                             f"{_cell(s, 'user_cos')} | {_cell(rnd, 'f1')} |")
    return "\n".join(lines) + "\n"


def plots(out: Path, result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sw = result["sweeps"]
    tag = f"{result['config']['model']['name']}"
    files = []

    def series(per_x, method, k, key):
        xs, ys, es = [], [], []
        for x, per in sorted(per_x.items(), key=lambda kv: float(kv[0])):
            s = per.get(method, {}).get(k) or per.get(method, {}).get(str(k))
            if s and key in s:
                xs.append(float(x))
                ys.append(s[key])
                es.append(s[key + "_std"])
        return xs, ys, es

    for sweep, xlabel, log in (("progress", "attack start t1 (fraction of training)", False),
                               ("interval", "rounds between observed uploads", True)):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        ks = sorted({int(k) for per in sw[sweep].values() for k in per.get("mgradinv", {})})
        for ax, key in zip(axes, ("f1", "user_cos")):
            for k in ks:
                xs, ys, es = series(sw[sweep], "mgradinv", k, key)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"MGradInv k={k}")
            if key == "f1":
                xs, ys, _ = series(sw[sweep], "random", 1, "f1")
                ax.plot(xs, ys, "k--", label="random guess")
            ax.set_xlabel(xlabel)
            ax.set_ylabel({"f1": "F1 of the recovered positives", "user_cos": "cos(u_hat, u)"}[key])
            if log:
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        files.append(_save(fig, out / f"{tag}-{sweep}.png"))
    cms = result.get("countermeasures") or []
    if len(cms) > 1:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for k in sorted({int(k) for c in cms for k in c["attack"]}):
            pts = [(c["final"].get("test_hr@10", float("nan")),
                    (c["attack"].get(k) or c["attack"].get(str(k)))["f1"], c["label"]) for c in cms
                   if (c["attack"].get(k) or c["attack"].get(str(k)))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=f"MGradInv k={k}")
            if k == 1:
                for x, y, lab in pts:
                    ax.annotate(lab, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        rnd = cms[0]["random"].get(1, cms[0]["random"].get("1", {})).get("f1")
        if rnd is not None:  # without countermeasure (padding adds ids: its own base rate)
            ax.axhline(rnd, color="k", ls="--", label="random guess (no countermeasure)")
        ax.set_xlabel("test HR@10 of the trained model")
        ax.set_ylabel("attack F1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        files.append(_save(fig, out / f"{tag}-countermeasures.png"))
    return files


def write_report(out, result=None):
    out = Path(out)
    if result is None:
        result = json.loads((out / "results.json").read_text())
    md = tables(result)
    files = plots(out, result)
    md += "\n" + "\n".join(f"![{f}]({f})" for f in files) + "\n"
    (out / "table.md").write_text(md)
    return out / "table.md"
