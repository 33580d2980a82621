"""What torch.compile gains around fastlora's LoRA layers: one training step
(forward, backward, AdamW) of a small Llama-style model with LoRA on every
projection, eager vs ``torch.compile(model)``, fastlora vs PEFT.

    python bench/compile_gain.py --out bench/results [--device cpu|cuda] [--threads N]

fastlora's LoRA op is an opaque custom op to the compiler (the same kernels run
in both modes), so the gain is what inductor fuses around it (norms, rotary
embeddings, SiLU-gating, residual adds, the optimizer is not compiled). Writes
``compile_<device>.md`` / ``.csv`` stamped like ``report.py``'s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import report  # noqa: E402  (timing quantiles, version stamp, device name)

import fastlora  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(impl: str, device: str, dtype: torch.dtype):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=512, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    if impl == "fastlora":
        fastlora.apply_lora(model, r=16, alpha=32.0, dropout=0.05, target_modules=TARGETS)
    else:
        import peft

        model = peft.get_peft_model(
            model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS),
            autocast_adapter_dtype=False,
        )
    return model.train()


def step_times(model, ids, reps: int, warmup: int, device: str) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(warmup + reps):
        report.sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        report.sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch, seq = (8, 512) if device == "cuda" else (4, 128)
    reps, warmup = args.reps or (20 if device == "cuda" else 8), 3
    fastlora.set_backend("auto" if device == "cuda" else "reference")
    ids = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    rows = []
    for impl in ("fastlora", "peft"):
        for mode in ("eager", "compiled"):
            model = build(impl, device, dtype)
            t_compile = None
            if mode == "compiled":
                model = torch.compile(model)
                t0 = time.perf_counter()
                step_times(model, ids, 1, 0, device)  # the first step compiles
                t_compile = time.perf_counter() - t0
            p20, med, p80 = report.quantiles(step_times(model, ids, reps, warmup, device))
            rows.append(dict(impl=impl, mode=mode, median_ms=med, p20_ms=p20, p80_ms=p80, first_step_s=t_compile))
            print(f"{impl:8s} {mode:8s} {med:8.1f} ms ({p20:.1f}-{p80:.1f})", flush=True)
    base = {r["impl"]: r["median_ms"] for r in rows if r["mode"] == "eager"}
    stamp = dict(device=report.device_name(device), **report.versions(),
                 date_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                 command="python bench/compile_gain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 model=f"Llama 4 layers, hidden 256, LoRA r=16 on q/k/v/o/gate/up/down, dropout 0.05, "
                       f"batch {batch}x{seq}, {str(dtype).replace('torch.', '')}, AdamW step included")
    os.makedirs(args.out, exist_ok=True)
    md = os.path.join(args.out, f"compile_{device}.md")
    with open(md, "w") as f:
        f.write(f"# torch.compile around LoRA layers ({device})\n\n")
        for k, v in stamp.items():
            f.write(f"- {k}: {v}\n")
        f.write("\nTraining-step time in ms, median (p20-p80); ratios are of medians.\n\n")
        f.write("| implementation | mode | step ms | vs its eager | vs PEFT eager | first compiled step s |\n|---|---|---|---|---|---|\n")
        for r in rows:
            first = f"{r['first_step_s']:.1f}" if r["first_step_s"] is not None else "-"
            f.write(f"| {r['impl']} | {r['mode']} | {r['median_ms']:.1f} ({r['p20_ms']:.1f}-{r['p80_ms']:.1f}) | "
                    f"{r['median_ms'] / base[r['impl']]:.3f} | {r['median_ms'] / base['peft']:.3f} | {first} |\n")
    with open(os.path.join(args.out, f"compile_{device}.csv"), "w") as f:
        f.write("impl,mode,median_ms,p20_ms,p80_ms,first_step_s\n")
        for r in rows:
            f.write(f"{r['impl']},{r['mode']},{r['median_ms']:.3f},{r['p20_ms']:.3f},{r['p80_ms']:.3f},{r['first_step_s'] or ''}\n")
    print(open(md).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
