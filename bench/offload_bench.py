"""Out-of-core prune of big random-initialised models under a hard memory cap.

    # build the checkpoints once (tensor by tensor; the 7B one is 13.5 GB of bf16 on disk)
    python bench/offload_bench.py build --shape 1b --out /tmp/wb-bench/llama-1b
    python bench/offload_bench.py build --shape 7b --out /tmp/wb-bench/llama-7b
    # prune one under a cgroup v1 memory cap (run as root), report peak RSS, s/block, zeros
    python bench/offload_bench.py prune --model /tmp/wb-bench/llama-7b --method wanda \
        --sparsity 0.5 --cap 4G --out /tmp/wb-bench/out-7b-wanda
    # bundled model: out-of-core vs in-memory (identical masks and perplexity)
    python bench/offload_bench.py bundled
    # bundled model: LAMBADA out of core vs in memory
    python bench/offload_bench.py lambada --data-dir ../shared/data --limit 40

The random weights make the perplexities meaningless; what is measured is memory and time.
Calibration is a random-token tensor (nsamples x seqlen), seeded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    # LLaMA-7B: hidden 4096, 32 blocks, intermediate 11008, vocab 32000
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    # a 1B-class shape (TinyLlama-1.1B: GQA 32/4 heads)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
}


def build(shape: str, out: Path, seed: int = 0) -> None:
    """Write a LLaMA-shaped bf16 checkpoint, one shard per block, never holding more than one
    block's tensors in memory."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    dims = SHAPES[shape]
    config = LlamaConfig(**dims, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    h, inter, n = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    kv = h // dims["num_attention_heads"] * dims["num_key_value_heads"]
    gen = torch.Generator().manual_seed(seed)

    def rand(*size):
        return (torch.randn(*size, generator=gen) * 0.02).to(torch.bfloat16)

    shards = n + 2
    weight_map, total = {}, 0

    def write(index: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        name = f"model-{index:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for key, value in tensors.items():
            weight_map[key] = name
            total += value.numel() * value.element_size()

    write(1, {"model.embed_tokens.weight": rand(dims["vocab_size"], h)})
    for i in range(n):
        p = f"model.layers.{i}."
        write(i + 2, {
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rand(h, h),
            p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h),
            p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(inter, h),
            p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter),
        })
        print(f"built block {i + 1}/{n}", flush=True)
    write(n + 2, {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                  "lm_head.weight": rand(dims["vocab_size"], h)})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(out)
    print(f"wrote {out} ({total / 2**30:.2f} GiB)")


# --- prune under a cgroup v1 memory cap -------------------------------------------------------


def _own_memory_cgroup() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/")
    raise SystemExit("no cgroup v1 memory controller here; run without --cap")


def _bytes(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def prune_capped(args: argparse.Namespace) -> dict:
    """Run `_run` in a child process inside a fresh memory cgroup capped at --cap; return its
    result with the cgroup's peak usage and failure count."""
    import subprocess

    cgroup = None
    argv = [sys.executable, __file__, "_run", *sys.argv[2:]]
    preexec = None
    if args.cap:
        cgroup = _own_memory_cgroup() / f"wb-bench-{os.getpid()}"
        cgroup.mkdir()
        (cgroup / "memory.limit_in_bytes").write_text(str(_bytes(args.cap)))
        if (cgroup / "memory.memsw.limit_in_bytes").exists():
            (cgroup / "memory.memsw.limit_in_bytes").write_text(str(_bytes(args.cap)))

        def preexec():
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    try:
        # the child runs this file by path: let it import `workbench` from this checkout
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        run = subprocess.run(argv, preexec_fn=preexec, capture_output=True, text=True, env=env)
        sys.stderr.write(run.stderr[-3000:])
        result = {"returncode": run.returncode}
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        if lines:
            result.update(json.loads(lines[-1]))
        if cgroup is not None:
            result["cap_bytes"] = _bytes(args.cap)
            result["cgroup_max_usage_bytes"] = int((cgroup / "memory.max_usage_in_bytes").read_text())
            result["cgroup_failcnt"] = int((cgroup / "memory.failcnt").read_text())
            stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
            result["cgroup_max_rss_note"] = "max_usage includes page cache (reclaimable), max RSS does not"
            result["cgroup_cache_now"] = int(stat.get("cache", 0))
        return result
    finally:
        if cgroup is not None:
            cgroup.rmdir()


def count_output_zeros(folder: Path, unfinished: bool = False) -> dict:
    """Zeros of every block linear in the output shards, counted one tensor at a time (of an
    unfinished folder: the block shards written so far)."""
    from safetensors import safe_open

    if unfinished:
        weight_map = {}
        for shard in sorted(folder.glob("model-*.safetensors")):
            with safe_open(shard, framework="pt") as handle:
                weight_map.update({key: shard.name for key in handle.keys()})
    else:
        weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    zeros = numel = 0
    for name, file in weight_map.items():
        if ".layers." not in name or not name.endswith("proj.weight"):
            continue
        with safe_open(folder / file, framework="pt") as handle:
            tensor = handle.get_tensor(name)
        zeros += tensor.numel() - int(torch.count_nonzero(tensor))
        numel += tensor.numel()
    return {"zeros": zeros, "numel": numel, "sparsity": zeros / numel if numel else 0.0}


def run(args: argparse.Namespace) -> dict:
    """The prune itself (inside the cap): random-token calibration, block times, peak RSS."""
    import resource

    import pandas as pd

    from workbench.memory import estimate_memory
    from workbench.offload import prune_from_disk
    from workbench.prune import PruneCancelled, PruneConfig

    config = PruneConfig(method=args.method, pattern=args.pattern, sparsity=args.sparsity, nsamples=args.nsamples,
                         seqlen=args.seqlen, batch_size=args.batch_size, offload="disk",
                         record_error=args.record_error)
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    estimate = estimate_memory(args.model, config, load_dtype="bf16")
    stamps = []
    started = time.perf_counter()

    def progress(fraction: float, message: str) -> None:
        # fraction 0, or "time left known" (a resumed run's first block): messages before a block is done
        if fraction and "time left known" not in message:
            stamps.append(time.perf_counter() - started)
        print(message, file=sys.stderr, flush=True)

    stopped = False
    try:
        result = prune_from_disk(args.model, args.out, config, calibration=ids, overwrite=not args.resume,
                                 resume=args.resume,
                                 progress=progress, should_stop=lambda: args.blocks is not None
                                 and len(stamps) >= args.blocks)
        timings = result.timings
    except PruneCancelled:  # --blocks: the per-block figures are in the unfinished folder's progress file
        stopped = True
        timings = pd.DataFrame(json.loads((args.out / ".progress" / "progress.json").read_text())["timings"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    per_block = [b - a for a, b in zip([0.0, *stamps[:-1]], stamps)]
    out = {"model": str(args.model), "method": args.method, "pattern": args.pattern,
           "record_error": args.record_error,
           "nsamples": args.nsamples, "seqlen": args.seqlen, "blocks_done": len(stamps), "stopped_early": stopped,
           "seconds": time.perf_counter() - started, "seconds_per_block": per_block, "peak_rss_bytes": rss,
           "estimate_offload_bytes": estimate.offload_bytes, "estimate_in_memory_bytes": estimate.in_memory_bytes,
           "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
    out["timings"] = timings.to_dict("list")
    out["zeros"] = count_output_zeros(args.out, stopped)
    return out


# --- the bundled model: out of core vs in memory --------------------------------------------


def bundled(args: argparse.Namespace) -> dict:
    from workbench.data import load_calibration
    from workbench.evaluate import evaluate
    from workbench.models import converted_default, load_model
    from workbench.offload import prune_from_disk
    from workbench.prune import PruneConfig, prune

    folder = converted_default()
    loaded = load_model(str(folder))
    config = PruneConfig(method=args.method, pattern=args.pattern, sparsity=args.sparsity, nsamples=args.nsamples,
                         seqlen=args.seqlen)
    calibration = load_calibration(loaded.tokenizer, "wikitext2", nsamples=args.nsamples, seqlen=args.seqlen,
                                   data_dir=args.data_dir)
    t0 = time.perf_counter()
    memory_result = prune(loaded.model, config, calibration=calibration)
    memory_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    prune_from_disk(folder, args.out, config, calibration=calibration, overwrite=True)
    disk_seconds = time.perf_counter() - t0
    disk = load_model(str(args.out))
    expected, got = loaded.model.state_dict(), disk.model.state_dict()
    same_weights = all(torch.equal(expected[k], got[k]) for k in expected)
    same_masks = all(torch.equal(expected[k] != 0, got[k] != 0) for k in expected)
    tasks = ["wikitext2"]
    ppl_memory = evaluate(loaded.model, loaded.tokenizer, tasks=tasks, limit=args.limit, data_dir=args.data_dir)
    ppl_disk = evaluate(disk.model, disk.tokenizer, tasks=tasks, limit=args.limit, data_dir=args.data_dir)
    return {"method": args.method, "pattern": args.pattern, "nsamples": args.nsamples, "seqlen": args.seqlen,
            "same_weights": same_weights, "same_masks": same_masks,
            "sparsity": memory_result.summary["blocks"], "seconds_in_memory": memory_seconds,
            "seconds_out_of_core": disk_seconds, "wikitext2_in_memory": ppl_memory, "wikitext2_out_of_core": ppl_disk,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3]}


def bundled_lambada(args: argparse.Namespace) -> dict:
    """LAMBADA (last word, last token) of the bundled model: in memory vs one block at a time."""
    from workbench.data import load_lambada
    from workbench.evaluate import _lambada
    from workbench.models import converted_default, load_model
    from workbench.offload_eval import lambada_from_disk

    folder = converted_default()
    texts = load_lambada(args.data_dir, limit=args.limit)
    loaded = load_model(str(folder))
    t0 = time.perf_counter()
    memory = _lambada(loaded.model, loaded.tokenizer, texts, 16, None, None, last_word=True, last_token=True)
    t1 = time.perf_counter()
    disk = lambada_from_disk(folder, texts, batch_size=16)
    out = {"n": len(texts), "seconds_in_memory": t1 - t0, "seconds_out_of_core": time.perf_counter() - t1,
           "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
    for task in memory:
        out[task] = {"in_memory": memory[task]["accuracy"], "out_of_core": disk[task]["accuracy"],
                     "same_items": memory[task]["items"]["accuracy"] == disk[task]["items"]["accuracy"]}
    out["lambada_perplexity"] = [memory["lambada"]["perplexity"], disk["lambada"]["perplexity"]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    build_p = sub.add_parser("build")
    build_p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    build_p.add_argument("--out", type=Path, required=True)
    for name in ("prune", "_run"):
        p = sub.add_parser(name)
        p.add_argument("--model", type=Path, required=True)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--method", default="wanda")
        p.add_argument("--pattern", default="unstructured")
        p.add_argument("--sparsity", type=float, default=0.5)
        p.add_argument("--nsamples", type=int, default=8)
        p.add_argument("--seqlen", type=int, default=128)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--blocks", type=int, default=None, help="stop after this many blocks")
        p.add_argument("--record-error", action="store_true",
                       help="also collect X^T X of every layer for the output-error report (Wanda does not "
                       "need it; on a 7B block it costs more than the prune)")
        p.add_argument("--cap", default=None, help="cgroup v1 memory cap, e.g. 4G (needs root)")
        p.add_argument("--resume", action="store_true", help="continue an unfinished prune in --out")
    b = sub.add_parser("bundled")
    b.add_argument("--out", type=Path, default=Path("/tmp/wb-bench/bundled-out"))
    b.add_argument("--method", default="sparsegpt")
    b.add_argument("--pattern", default="unstructured")
    b.add_argument("--sparsity", type=float, default=0.5)
    b.add_argument("--nsamples", type=int, default=32)
    b.add_argument("--seqlen", type=int, default=256)
    b.add_argument("--limit", type=int, default=None)
    b.add_argument("--data-dir", default=None)
    lam = sub.add_parser("lambada")
    lam.add_argument("--limit", type=int, default=40)
    lam.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    if args.cmd == "build":
        build(args.shape, args.out)
        return
    result = {"prune": prune_capped, "_run": run, "bundled": bundled, "lambada": bundled_lambada}[args.cmd](args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
