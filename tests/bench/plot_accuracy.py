#!/usr/bin/env python3
"""Summarise and plot runs of `kfac train`: reads OUT/NAME/metrics.jsonl for
each NAME, prints JSON lines (epochs and minutes to reach 89/90/91% test
accuracy, final and best accuracy, with and without precise BN; ratios of
the first run to the second where both reach a target), and writes
OUT/accuracy.svg: test accuracy per epoch, solid without and dashed with
precise BN.  Standard library only.

usage: plot_accuracy.py OUT NAME [NAME ...]
"""
import json, os, sys

TARGETS = (0.89, 0.90, 0.91)
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def first_reach(rows, key, target):
    for r in rows:
        if r.get(key, -1) >= target:
            return r["epoch"], r["seconds"] / 60
    return None, None


def summarise(out, names):
    runs = {n: load(os.path.join(out, n, "metrics.jsonl")) for n in names}
    reach = {}
    for name, rows in runs.items():
        for key in ("test_acc", "test_acc_precise_bn"):
            if key not in rows[0]:
                continue
            label = "precise_bn" if key.endswith("precise_bn") else "plain"
            print(json.dumps({"name": f"{name}_final_{key}", "value": round(rows[-1][key], 4),
                              "unit": "fraction", "best": round(max(r[key] for r in rows), 4),
                              "epochs": rows[-1]["epoch"], "minutes": round(rows[-1]["seconds"] / 60, 2)}))
            for t in TARGETS:
                e, mins = first_reach(rows, key, t)
                reach[(name, label, t)] = (e, mins)
                print(json.dumps({"name": f"{name}_{label}_to_{int(t * 100)}pct", "epochs": e,
                                  "minutes": None if mins is None else round(mins, 2), "unit": "epochs"}))
    if len(names) >= 2:
        a, b = names[1], names[0]
        for label in ("plain", "precise_bn"):
            for t in TARGETS:
                ea, ma = reach.get((a, label, t), (None, None))
                eb, mb = reach.get((b, label, t), (None, None))
                if ma is not None and mb is not None:
                    print(json.dumps({"name": f"minutes_to_{int(t * 100)}pct_{label}_{a}_vs_{b}",
                                      "value": round(ma, 2), "unit": "minutes", "peer": b,
                                      "peer_value": round(mb, 2), "ratio": round(ma / mb, 3)}))
    return runs


def svg(out, runs):
    w, h, ml, mr, mt, mb = 720, 440, 60, 160, 20, 50
    epochs = max(r[-1]["epoch"] for r in runs.values())
    lo, hi = 0.70, 0.95
    def x(e): return ml + (w - ml - mr) * (e - 1) / max(1, epochs - 1)
    def y(a): return mt + (h - mt - mb) * (1 - (min(max(a, lo), hi) - lo) / (hi - lo))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>']
    for k in range(0, 6):
        a = lo + k * (hi - lo) / 5
        parts.append(f'<line x1="{ml}" x2="{w - mr}" y1="{y(a):.1f}" y2="{y(a):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{ml - 6}" y="{y(a) + 4:.1f}" text-anchor="end">{100 * a:.0f}%</text>')
    for e in range(1, epochs + 1, max(1, epochs // 10)):
        parts.append(f'<text x="{x(e):.1f}" y="{h - mb + 18}" text-anchor="middle">{e}</text>')
    parts.append(f'<text x="{(ml + w - mr) / 2}" y="{h - 10}" text-anchor="middle">epoch</text>')
    parts.append(f'<text x="14" y="{(mt + h - mb) / 2}" transform="rotate(-90 14 {(mt + h - mb) / 2})" '
                 'text-anchor="middle">test accuracy</text>')
    legend_y = mt + 10
    for i, (name, rows) in enumerate(runs.items()):
        colour = COLOURS[i % len(COLOURS)]
        for key, dash in (("test_acc", ""), ("test_acc_precise_bn", ' stroke-dasharray="6 4"')):
            if key not in rows[0]:
                continue
            pts = " ".join(f"{x(r['epoch']):.1f},{y(r[key]):.1f}" for r in rows)
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
            label = name + (" (precise BN)" if key.endswith("precise_bn") else "")
            parts.append(f'<line x1="{w - mr + 10}" x2="{w - mr + 34}" y1="{legend_y}" y2="{legend_y}" '
                         f'stroke="{colour}" stroke-width="2"{dash}/>')
            parts.append(f'<text x="{w - mr + 40}" y="{legend_y + 4}">{label}</text>')
            legend_y += 18
    parts.append("</svg>")
    path = os.path.join(out, "accuracy.svg")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")
    print(json.dumps({"name": "plot", "path": path}))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    svg(sys.argv[1], summarise(sys.argv[1], sys.argv[2:]))
