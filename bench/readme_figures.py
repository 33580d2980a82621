"""Print the README's "Measured" tables from the CSVs in bench/results.

    python bench/readme_figures.py [--results bench/results] [--device cpu] [--write-readme README.md]

Reads lora_<device>.csv (bench/report.py), qlora_<device>.csv
(bench/report_qlora.py), dora_<device>.csv (bench/report_dora.py),
compile_<device>.csv (bench/compile_gain.py), multi_<device>.csv
(bench/report_multi.py), dropout_<device>.csv (bench/report_dropout.py) and
host_overhead_<device>.csv (bench/host_overhead.py), so the README quotes
exactly what those commands measured.
"""

from __future__ import annotations

import argparse
import csv
import os


def rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ms(row: dict, key: str) -> str:
    v = float(row[key])
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def lora_table(path: str) -> list[str]:
    out = ["| shape (M x K x N), r, dtype | dropout | fastlora ms | PEFT ms | fastlora / PEFT | saved bytes, fastlora / PEFT |",
           "|---|---|---|---|---|---|"]
    for r in rows(path):
        ratio = float(r["fastlora_both_ms"]) / float(r["peft_both_ms"])
        out.append(f"| {r['M']} x {r['K']} x {r['N']}, r={r['r']}, {r['dtype']} | {r['dropout']} | "
                   f"{ms(r, 'fastlora_both_ms')} | {ms(r, 'peft_both_ms')} | {ratio:.2f} | "
                   f"{int(r['fastlora_saved_bytes']):,} / {int(r['peft_saved_bytes']):,} "
                   f"({float(r['saved_ratio_fastlora_peft']):.3f}) |")
    return out


def qlora_lines(path: str) -> list[str]:
    data = rows(path)
    out = []
    deq = [r for r in data if r["section"] == "dequant"]
    if deq:
        out += ["| weight | fastlora dequant ms | bitsandbytes ms | fastlora / bnb (thread CPU) | one gather pass / bnb "
                "(thread CPU) | same bytes and values as bitsandbytes |",
                "|---|---|---|---|---|---|"]
        for r in deq:
            bnb = bool(r.get("bnb_ms"))
            out.append(f"| {r['case']} | {ms(r, 'fastlora_ms')} | {ms(r, 'bnb_ms') if bnb else 'n/a'} | "
                       f"{float(r['ratio_fastlora_bnb_cpu']):.2f} | {float(r['ratio_gather_bnb_cpu']):.2f} | "
                       f"{r['packed_equals_bnb']}, {r['output_equals_bnb']} |" if bnb else
                       f"| {r['case']} | {ms(r, 'fastlora_ms')} | n/a | n/a | n/a | n/a |")
        out.append("")
    layer = [r for r in data if r["section"] == "layer"]
    for r in layer:
        keys = {k: k for k in r}
        q, lo, b = (keys.get(f"{impl}_both_ms") for impl in ("qlora", "lora", "bnb_peft"))
        if q and lo:
            text = (f"QLoRA layer {r['shape']} ({r['quant']}, {float(r['qlora_weight_bytes_per_param']):.4f} bytes per "
                    f"base parameter): forward+backward {ms(r, q)} ms vs {ms(r, lo)} ms for LoRA on the "
                    f"full-precision weight ({float(r[q]) / float(r[lo]):.2f}x)")
            if b and r.get(b):
                text += f" and {ms(r, b)} ms for bitsandbytes + PEFT ({float(r[q]) / float(r[b]):.2f}x)"
            out.append(text + ".")
    return out


def dora_table(path: str) -> list[str]:
    out = ["| shape | dropout | DoRA ms | LoRA ms | PEFT DoRA ms | DoRA / PEFT DoRA | saved bytes DoRA / PEFT DoRA |",
           "|---|---|---|---|---|---|---|"]
    for r in rows(path):
        out.append(f"| {r['shape']} | {r['dropout']} | {ms(r, 'dora_both_ms')} | {ms(r, 'lora_both_ms')} | "
                   f"{ms(r, 'peft_dora_both_ms')} | {float(r['dora_both_ms']) / float(r['peft_dora_both_ms']):.2f} | "
                   f"{int(r['dora_saved_bytes']):,} / {int(r['peft_dora_saved_bytes']):,} |")
    return out


def compile_table(path: str) -> list[str]:
    data = rows(path)
    if not data:
        return []
    base = {r["impl"]: float(r["median_ms"]) for r in data if r["mode"] == "eager"}
    out = ["| implementation | mode | step ms | vs PEFT eager |", "|---|---|---|---|"]
    for r in data:
        out.append(f"| {r['impl']} | {r['mode']} | {float(r['median_ms']):.1f} | {float(r['median_ms']) / base['peft']:.2f} |")
    return out


def multi_table(path: str) -> list[str]:
    data = rows(path)
    if not data:
        return []
    out = ["| case | phase | multi ms | one adapter ms | multi / one (thread CPU) | bytes floor | one after the other ms | "
           "PEFT `adapter_names` ms |", "|---|---|---|---|---|---|---|---|"]
    by = {(r["case"], r["phase"], r["impl"]): r for r in data}
    for r in data:
        if r["impl"] != "multi":
            continue
        key = (r["case"], r["phase"])
        single, seq, peft = (by.get((*key, impl)) for impl in ("single", "sequential", "peft"))
        phase = "forward" if r["phase"] == "fwd" else "forward+backward"
        out.append(f"| {r['case']} | {phase} | {ms(r, 'median_ms')} | {ms(single, 'median_ms')} | "
                   f"{float(r['thread_ratio_vs_single']):.2f} | {float(r['bytes_floor']) if r.get('bytes_floor') else float('nan'):.2f} | "
                   f"{ms(seq, 'median_ms') if seq else 'n/a'} | {ms(peft, 'median_ms') if peft else 'inference only'} |")
    return out


def dropout_table(path: str) -> list[str]:
    data = rows(path)
    if not data:
        return []
    out = ["| shape | implementation | forward+backward ms (thread CPU) | / frozen nn.Linear | saved bytes |",
           "|---|---|---|---|---|"]
    names = [("linear", "frozen nn.Linear"), ("no_dropout", "fastlora, dropout 0"),
             ("regenerate", "fastlora, dropout 0.1, regenerate"), ("stored_bits", "fastlora, dropout 0.1, stored_bits"),
             ("peft", "PEFT, dropout 0.1")]  # fmt: skip
    for r in data:
        for key, label in names:
            saved = r.get(f"{key}_saved_bytes")
            out.append(f"| {r['shape']} | {label} | {ms(r, f'{key}_cpu_ms')} | {float(r[f'{key}_over_linear_cpu']):.3f} | "
                       f"{int(saved):,} |" if saved else
                       f"| {r['shape']} | {label} | {ms(r, f'{key}_cpu_ms')} | {float(r[f'{key}_over_linear_cpu']):.3f} | |")
    return out


def host_table(path: str) -> list[str]:
    data = rows(path)
    if not data:
        return []
    med = {(r["mode"], r["impl"]): float(r["median_us"]) for r in data}
    cpu = {(r["mode"], r["impl"]): float(r["cpu_median_us"]) for r in data if r.get("cpu_median_us")}
    modes = list(dict.fromkeys(r["mode"] for r in data))
    targets = {"eval": 0.5, "train": 0.7}
    out = ["| mode | fastlora us | PEFT us | nn.Linear us | fastlora / PEFT | fastlora / PEFT (thread CPU) | target |",
           "|---|---|---|---|---|---|---|"]
    for mode in modes:
        f, p, lin = (med.get((mode, impl)) for impl in ("fastlora", "peft", "nn.Linear"))
        fc, pc = cpu.get((mode, "fastlora")), cpu.get((mode, "peft"))
        target = next((f"<= {v}" for k, v in targets.items() if mode.startswith(k)), "")
        thread = f"{fc / pc:.2f}" if fc and pc else "n/a"
        out.append(f"| {mode} | {f:.1f} | {p:.1f} | {lin:.1f} | {f / p:.2f} | {thread} | {target} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--write-readme", metavar="README", help="replace the <!-- figures:NAME --> blocks in this file")
    args = ap.parse_args()
    blocks = {
        "LoRA": lora_table(os.path.join(args.results, f"lora_{args.device}.csv")),
        "QLoRA": qlora_lines(os.path.join(args.results, f"qlora_{args.device}.csv")),
        "DoRA": dora_table(os.path.join(args.results, f"dora_{args.device}.csv")),
        "compile": compile_table(os.path.join(args.results, f"compile_{args.device}.csv")),
        "multi": multi_table(os.path.join(args.results, f"multi_{args.device}.csv")),
        "dropout": dropout_table(os.path.join(args.results, f"dropout_{args.device}.csv")),
        "host": host_table(os.path.join(args.results, f"host_overhead_{args.device}.csv")),
    }
    if not args.write_readme:
        for title, lines in blocks.items():
            print(f"<!-- figures:{title} -->\n" + "\n".join(lines) + f"\n<!-- /figures:{title} -->\n")
        return
    with open(args.write_readme) as f:
        text = f.read()
    for title, lines in blocks.items():
        start, end = f"<!-- figures:{title} -->", f"<!-- /figures:{title} -->"
        if start not in text or end not in text:
            raise SystemExit(f"{args.write_readme}: no {start} ... {end} block")
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + start + "\n" + "\n".join(lines) + "\n" + end + tail
    with open(args.write_readme, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
