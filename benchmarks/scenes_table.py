"""The README's pocketvlm-scenes table from the JSON reports of `pocketvlm eval`:

    python benchmarks/scenes_table.py DEPLOYED.json [FP32.json]

Per type: the deployed form's accuracy with its 95% interval, the blind baseline, chance, the gap to blind,
the float32 model on the same (first N per type) questions and the deployed form's accuracy on those, and the
issue's target."""
import json
import sys

TARGETS = {"colour": 95, "shape": 95, "count": 80, "relation": 85, "word": 80, "chart": 80}


def main(argv):
    dep = json.load(open(argv[0]))
    fp = json.load(open(argv[1]))["model"] if len(argv) > 1 else None
    model, blind = dep["model"], dep["blind"]
    fp_ids = {r["id"] for r in fp["records"]} if fp else set()
    print("| type | n | pocketvlm-scenes (q4f16_1) % [95% CI] | blind % | chance % | gap to blind | "
          "fp32 model % (n) | q4f16_1 on those % | target % |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t, s in list(model["per_type"].items()) + [("overall", model["overall"])]:
        b = blind["per_type"][t] if t != "overall" else blind["overall"]
        lo, hi = s["interval"] if "interval" in s else s["ci95"]
        row = [t, str(s["n"]), f"**{100 * s['accuracy']:.1f}** [{100 * lo:.1f}, {100 * hi:.1f}]",
               f"{100 * b['accuracy']:.1f}", f"{100 * s['chance']:.1f}" if s.get("chance") else "-",
               f"{100 * (s['accuracy'] - b['accuracy']):+.1f}"]
        if fp:
            recs = [r for r in fp["records"] if t == "overall" or r["type"] == t]
            mine = [r for r in model["records"] if r["id"] in fp_ids and (t == "overall" or r["type"] == t)]
            row += [f"{100 * sum(r['correct'] for r in recs) / len(recs):.1f} ({len(recs)})",
                    f"{100 * sum(r['correct'] for r in mine) / len(mine):.1f}"]
        else:
            row += ["-", "-"]
        row.append(str(TARGETS.get(t, "-")))
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
