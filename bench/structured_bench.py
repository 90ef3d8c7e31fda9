"""Retrain-free structured pruning of the bundled model: quality at 10% / 20% MLP channels, and
speed / size of the slimmed model.

    python bench/structured_bench.py --out /tmp/structured.jsonl          # every run, then tables
    python bench/structured_bench.py --runs dense rf:0.2 speed:0.2 --out /tmp/structured.jsonl
    python bench/structured_bench.py --report /tmp/structured.jsonl       # the markdown only

Runs: `dense`; `rf:S` (retrain-free, Fisher + rearrangement + mask tuning), `rf-notune:S` (the same
without mask tuning, as INC), `magnitude:S` and `wanda:S` (cheap channel scores, per block, no
tuning) — S is the sparsity over the MLP block — and `speed:S`: prune retrain-free at S, slim
(rounded up to a multiple of 32 channels; and padded to a uniform size, which stock
`from_pretrained` reloads) and time dense vs slimmed in the same process, interleaved.
Each result is appended to the JSONL file as soon as it exists.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.data import load_calibration, load_lambada, load_wikitext2_test
from workbench.evaluate import _lambada, perplexity
from workbench.models import load_model
from workbench.prune import PruneConfig, prune
from workbench.slim import save_slimmed, slim_model
from workbench.sparsity import sparsity_summary

log = logging.getLogger("structured_bench")

DEFAULT_RUNS = ["speed:0.2", "dense", "rf:0.2", "wanda:0.2", "rf-notune:0.2", "magnitude:0.2",
                "rf:0.1", "wanda:0.1", "rf-notune:0.1", "magnitude:0.1"]


def evaluate_model(model, tokenizer, args) -> dict:
    """LAMBADA (first `--lambada` passages; 0 skips it) and WikiText-2 perplexity."""
    ppl = perplexity(model, tokenizer, load_wikitext2_test(), seqlen=512, batch_size=4,
                     limit=args.windows)
    figures = {"wikitext2_ppl": ppl["perplexity"]}
    if args.lambada:
        texts = load_lambada(limit=args.lambada)
        lam = _lambada(model, tokenizer, texts, 16, None, None, last_word=True, last_token=True)
        figures.update(last_word=lam["lambada"]["accuracy"],
                       last_token=lam["lambada-last-token"]["accuracy"])
    return figures


def config_for(kind: str, sparsity: float, args) -> PruneConfig:
    """`rf`, `rf-notune`, `wanda`, `magnitude` (MLP channels), with `-head` appended for attention
    heads (KV groups on this GQA model), e.g. `rf-head`, `rf-notune-head`, `wanda-head`."""
    pattern, scope = ("head", "attention") if kind.endswith("-head") else ("channel", "mlp")
    kind = kind.removesuffix("-head")
    method = {"rf": "retrain-free", "rf-notune": "retrain-free", "speed": "retrain-free"}.get(kind,
                                                                                          kind)
    return PruneConfig(method=method, pattern=pattern, scope=scope, sparsity=sparsity,
                       nsamples=args.nsamples, seqlen=args.seqlen, batch_size=4,
                       mask_tuning=kind != "rf-notune" if method == "retrain-free" else False)


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). On a shared machine the CPU time is the
    steadier measure of the work done; with one thread it does not count spin-waiting."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


@torch.inference_mode()
def time_models(models: dict, tokenizer, repeats: int, new_tokens: int) -> dict:
    """Forward latency at batch 1 and 8 (512 tokens) and greedy generation tokens/s, the models
    interleaved within each repeat so they share the machine's load; best of the repeats (the
    batch-8 forward once per model)."""
    generator = torch.Generator().manual_seed(0)
    ids1 = torch.randint(100, 40000, (1, 512), generator=generator)
    ids8 = torch.randint(100, 40000, (8, 512), generator=generator)
    prompt = tokenizer("The history of the city begins", return_tensors="pt")
    runs = {name: {"b1": [], "b8": [], "gen": []} for name in models}
    for model in models.values():  # warm-up
        model(ids1)
    for repeat in range(repeats):
        for name, model in models.items():
            runs[name]["b1"].append(_timed(lambda m=model: m(ids1)))
            if repeat == 0:
                runs[name]["b8"].append(_timed(lambda m=model: m(ids8)))
            runs[name]["gen"].append(_timed(lambda m=model: m.generate(
                **prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False)))
    out = {}
    for name, r in runs.items():
        out[name] = {}
        for key in ("b1", "b8", "gen"):
            out[name][f"{key}_wall_s"] = min(w for w, _ in r[key])
            out[name][f"{key}_cpu_s"] = min(c for _, c in r[key])
            out[name][f"{key}_all"] = r[key]
        out[name]["new_tokens"] = new_tokens
    return out


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run_speed(sparsity: float, calibration, args) -> dict:
    """Speed depends only on the shapes: a uniform per-block count (magnitude channel scores, no
    calibration) rounded up to a multiple of 32 stands for any uniform 20% channel prune."""
    from transformers import AutoModelForCausalLM

    dense = load_model("default").model
    loaded = load_model("default")
    config = PruneConfig(method="magnitude", pattern="channel", scope="mlp", sparsity=sparsity,
                         record_error=False)
    result = prune(loaded.model, config)
    masked = loaded.model
    check = calibration.ids[:1, :128]
    with torch.inference_mode():
        masked_logits = masked(check).logits
    slim = slim_model(masked, result, round_to=32, uniform=True)
    with torch.inference_mode():
        diff = (slim.model(check).logits - masked_logits).abs().max().item()
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in (("dense", dense), ("slim", slim.model)):
            folder = save_slimmed(model, None, Path(tmp) / name)
            sizes[name] = folder_bytes(folder)
        stock = AutoModelForCausalLM.from_pretrained(Path(tmp) / "slim")
        with torch.inference_mode():
            diff_stock = (stock(check).logits - masked_logits).abs().max().item()
        del stock
    timing = time_models({"dense": dense, "slim": slim.model}, loaded.tokenizer, args.repeats,
                         args.new_tokens)
    params = {"dense": slim.parameters_before, "slim": slim.parameters_after}
    summary = sparsity_summary(slim.model, reference_shapes=slim.reference_shapes)
    return {"run": f"speed:{sparsity}", "size": slim.sizes[0],
            "stock_loadable": slim.stock_loadable,
            "max_abs_diff": {"slim_vs_masked": diff, "stock_reload_vs_masked": diff_stock},
            "parameters": params, "file_bytes": sizes, "timing": timing,
            "mlp_sparsity_counted": summary["mlp"], "matmul_counted": summary["matmul"]}


def run_quality(name: str, calibration, args) -> dict:
    loaded = load_model("default")
    if name == "dense":
        return {"run": name, **evaluate_model(loaded.model, loaded.tokenizer, args)}
    kind, sparsity = name.split(":")
    result = prune(loaded.model, config_for(kind, float(sparsity), args), calibration=calibration)
    kept = [len(k) for k in result.structure.kept]
    return {"run": name, "mlp_sparsity": result.summary["mlp"], "matmul": result.summary["matmul"],
            "attention_sparsity": result.summary["attention"], "unit": result.structure.unit,
            "removed_units": sum(result.structure.num_units) - sum(kept),
            "prune_seconds": result.seconds, "kept_min": min(kept), "kept_max": max(kept),
            **evaluate_model(loaded.model, loaded.tokenizer, args)}


def report(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_run = {r["run"]: r for r in rows}
    dense = by_run.get("dense")
    lines = ["| run | over MLP block | over attention | element-wise/matmul | kept units/block | "
             "LAMBADA last token | rel. drop | LAMBADA last word | rel. drop | WikiText-2 ppl | "
             "prune s |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["run"].startswith("speed"):
            continue

        def drop(key, r=r):
            if dense is None or r is dense:
                return ""
            return f"{(r[key] - dense[key]) / dense[key]:+.2%}"
        kept = f"{r['kept_min']}-{r['kept_max']} {r.get('unit', 'channel')}s" \
            if "kept_min" in r else "all"
        lam = (f"{r['last_token']:.4f} | {drop('last_token')} | {r['last_word']:.4f} | "
               f"{drop('last_word')}") if "last_word" in r else "- | - | - | -"
        lines.append(f"| {r['run']} | {r.get('mlp_sparsity', 0):.4f} | "
                     f"{r.get('attention_sparsity', 0):.4f} | {r.get('matmul', 0):.4f} | "
                     f"{kept} | {lam} | {r['wikitext2_ppl']:.2f} | "
                     f"{r.get('prune_seconds', 0):.0f} |")
    for r in rows:
        if not r["run"].startswith("speed"):
            continue
        t, p, f = r["timing"], r["parameters"], r["file_bytes"]
        if "b1_wall_s" not in t.get("dense", {}):
            continue  # a row from an older version of this script
        threads = r["settings"]["threads"]
        lines += ["", f"Speed and size, {r['run']} (uniform channel count rounded up to 32, "
                  f"slimmed; {threads} thread(s); dense / slim time ratios in the same process):",
                  "", "| model | params | file MB | 1x512 fwd wall s | cpu s | 8x512 fwd wall s | "
                  "cpu s | generate 32 tok wall s | cpu s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name in ("dense", "slim"):
            s = t[name]
            lines.append(f"| {name} | {p[name] / 1e6:.1f}M | {f[name] / 2**20:.0f} | "
                         f"{s['b1_wall_s']:.2f} | {s['b1_cpu_s']:.2f} | {s['b8_wall_s']:.1f} | "
                         f"{s['b8_cpu_s']:.1f} | {s['gen_wall_s']:.1f} | {s['gen_cpu_s']:.1f} |")
        d, s = t["dense"], t["slim"]
        ratio = " | ".join(f"{d[k] / s[k]:.2f}x" for k in ("b1_wall_s", "b1_cpu_s", "b8_wall_s",
                                                          "b8_cpu_s", "gen_wall_s", "gen_cpu_s"))
        lines.append(f"| speed-up | {p['dense'] / p['slim']:.2f}x fewer | "
                     f"{f['dense'] / f['slim']:.2f}x smaller | {ratio} |")
        lines.append("")
        lines.append(f"Slimmed vs masked logits, max |diff|: {r['max_abs_diff']}; kept channels "
                     f"per block {r['size']} (stock from_pretrained reload: "
                     f"{r['stock_loadable']}); counted over MLP block "
                     f"{r['mlp_sparsity_counted']:.4f}, element-wise/matmul "
                     f"{r['matmul_counted']:.4f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=DEFAULT_RUNS)
    parser.add_argument("--out", type=Path, default=Path("/tmp/structured_bench.jsonl"))
    parser.add_argument("--report", type=Path)
    parser.add_argument("--lambada", type=int, default=500,
                        help="first N LAMBADA passages (0: perplexity only)")
    parser.add_argument("--windows", type=int, default=20, help="first N WikiText-2 windows")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.report:
        print(report(args.report))
        return 0
    torch.set_num_threads(args.threads)
    tokenizer = load_model("default").tokenizer
    calibration = load_calibration(tokenizer, "wikitext2", nsamples=args.nsamples,
                                   seqlen=args.seqlen, seed=0)
    for name in args.runs:
        started = time.perf_counter()
        if name.startswith("speed:"):
            row = run_speed(float(name.split(":")[1]), calibration, args)
        else:
            row = run_quality(name, calibration, args)
        row["wall_s"] = time.perf_counter() - started
        row["settings"] = {"lambada": args.lambada, "windows": args.windows,
                           "nsamples": args.nsamples, "seqlen": args.seqlen,
                           "threads": args.threads}
        with args.out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        log.info("%s done in %.0f s: %s", name, row["wall_s"],
                 {k: v for k, v in row.items() if not isinstance(v, dict)})
    print(report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
