"""The README.md of an export: a Hugging Face model card with YAML front matter.

It says what was pruned and how, the sparsity counted from the exported weights (per module kind
and the seed's totals), evaluation dense vs pruned with the relative drop, the heatmap, how to
load each format, and what to expect of speed.
"""

from __future__ import annotations

import json
import math
import re

import pandas as pd

# The bundled default is a GGUF of this hub model (Apache-2.0).
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

FORMAT_TITLES = {
    "masked": "masked (dense layout, zeros in place)",
    "compact": "compact sparse (bitmask)",
    "slimmed": "slimmed (channels/heads removed)",
}


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.{digits}f}"
    return str(value)


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def _yaml(value) -> str:
    return json.dumps(value)  # a JSON scalar or list is valid YAML and needs no escaping rules


def base_model_of(model_info: dict) -> str | None:
    """The hub id this export derives from, when one is known."""
    if model_info.get("base_model"):
        return str(model_info["base_model"])
    kind = model_info.get("kind")
    if kind == "default":
        return DEFAULT_BASE_MODEL
    if kind == "hub":
        return model_info.get("resolved") or model_info.get("source")
    return None


def display_name(model_info: dict) -> str:
    """The model's name for a title: its hub id, else the name of its folder or file. Never a local
    path: it tells a reader nothing and shows where the exporter keeps files."""
    base = base_model_of(model_info)
    if base:
        return base
    source = re.split(r"[\\/]", str(model_info.get("source") or "").rstrip("/\\"))[-1]
    return source or "model"


def front_matter(recipe: dict, model_info: dict) -> str:
    prune = recipe.get("prune") or {}
    tags = ["pruned", "sparsity", "prune-workbench"]
    for tag in (prune.get("method"), prune.get("pattern")):
        if tag and str(tag) not in tags:
            tags.append(str(tag).replace(":", "of"))
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             f"tags: {_yaml(tags)}"]
    base = base_model_of(model_info)
    if base:
        lines.append(f"base_model: {_yaml(base)}")
    license_ = model_info.get("license") or ("apache-2.0" if model_info.get("kind") == "default" else None)
    if license_:
        lines.append(f"license: {_yaml(license_)}")
    lines.append("---")
    return "\n".join(lines)


def sparsity_section(summary: dict, table: pd.DataFrame | None) -> list[str]:
    lines = ["## Sparsity (counted from the exported weights)", "",
             "| where | sparsity |", "| :--- | ---: |",
             f"| over MLP block | {_fmt(summary.get('mlp'))} |",
             f"| over attention | {_fmt(summary.get('attention'))} |",
             f"| all decoder-block linears | {_fmt(summary.get('blocks'))} |",
             f"| element-wise over matmul (block linears + LM head) | {_fmt(summary.get('matmul'))} |",
             f"| all parameters (embeddings and norms included) | {_fmt(summary.get('parameters'))} |",
             ""]
    if table is not None and not table.empty:
        grouped = table.groupby("kind", sort=False)[["zeros", "numel"]].sum()
        lines += ["Per module kind:", "", "| module | zeros | elements | sparsity |",
                  "| :--- | ---: | ---: | ---: |"]
        for kind, row in grouped.iterrows():
            zeros, numel = int(row["zeros"]), int(row["numel"])
            lines.append(f"| {kind} | {zeros:,} | {numel:,} | {_fmt(zeros / numel if numel else 0.0)} |")
        lines.append("")
    return lines


INTERVAL_NOTE = ("Intervals: accuracy with its standard error as lm-eval defines it and a 95% Wilson "
                 "interval; perplexity with a 95% bootstrap interval over windows/passages. The difference "
                 "is paired (both models scored on the same items): a paired bootstrap interval, and for "
                 "accuracies an exact McNemar test decides `significant` (p < 0.05).")


def _evaluation_pair(evaluation: dict) -> tuple[dict | None, dict | None]:
    dense = evaluation.get("dense")
    sparse = evaluation.get("sparse", evaluation.get("pruned"))
    if dense is None and sparse is None:
        sparse = evaluation  # a bare evaluate() result: the pruned model's figures only
    return dense, sparse


def evaluation_section(evaluation: dict | None) -> list[str]:
    if not evaluation:
        return ["## Evaluation", "", "Not evaluated in this export.", ""]
    from workbench.evaluate import compare
    from workbench.intervals import format_interval

    dense, sparse = _evaluation_pair(evaluation)
    lines = ["## Evaluation", ""]
    if dense and sparse:
        table = compare(dense, sparse)
        intervals = "difference 95% CI" in table.columns
        if intervals:
            lines += ["| metric | dense (95% CI) | pruned (95% CI) | relative drop | difference (95% CI) "
                      "| significant |", "| :--- | ---: | ---: | ---: | ---: | :---: |"]
        else:
            lines += ["| metric | dense | pruned | relative drop |", "| :--- | ---: | ---: | ---: |"]
        for row in table.itertuples(index=False):
            drop = row[3]
            shown = f"{drop:+.2f}%" if isinstance(drop, float) and math.isfinite(drop) else "n/a"
            if intervals:
                verdict = {True: "yes", False: "no"}.get(row[8], "n/a")
                difference = f"{_fmt(row[6])} {row[7]}" if row[7] else "n/a"
                lines.append(f"| {row[0]} | {_fmt(row[1])} {row[4]} | {_fmt(row[2])} {row[5]} | {shown} "
                             f"| {difference} | {verdict} |")
            else:
                lines.append(f"| {row[0]} | {_fmt(row[1])} | {_fmt(row[2])} | {shown} |")
        lines += ["", "Relative drop is (pruned - dense) / dense: negative is worse for accuracy, "
                  "positive is worse for perplexity."]
        if intervals:
            lines += ["", INTERVAL_NOTE]
    else:
        figures_of = {task: figures for task, figures in (sparse or dense or {}).items() if isinstance(figures, dict)}
        intervals = any(f"{m}_ci" in f for f in figures_of.values() for m in ("accuracy", "perplexity"))
        lines += ["| task | metric | pruned | 95% CI |" if intervals else "| task | metric | pruned |",
                  "| :--- | :--- | ---: | ---: |" if intervals else "| :--- | :--- | ---: |"]
        for task, figures in figures_of.items():
            for metric in ("accuracy", "perplexity"):
                if metric in figures:
                    ci = f" {format_interval(figures.get(metric + '_ci'))} |" if intervals else ""
                    lines.append(f"| {task} | {metric} | {_fmt(figures[metric])} |{ci}")
        conventions = {task: f["convention"] for task, f in figures_of.items() if f.get("convention")}
        if conventions:
            lines += ["", "Perplexity windows: " + "; ".join(f"{t}: {c}" for t, c in conventions.items()) + "."]
    limits = {f"{task}": figures.get("n", figures.get("windows"))
              for task, figures in (sparse or dense or {}).items() if isinstance(figures, dict)}
    limits = {k: v for k, v in limits.items() if v is not None}
    if limits:
        lines += ["", "Evaluated on: " + ", ".join(f"{k} {v} items" for k, v in limits.items()) + "."]
    lines.append("")
    return lines


def _load_snippet(fmt: str, info: dict) -> list[str]:
    folder = info.get("folder") or ""
    where = "path/to/export" if folder in ("", ".") else f"path/to/export/{folder}"
    if fmt == "masked":
        return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'model = AutoModelForCausalLM.from_pretrained("{where}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```"]
    if fmt == "compact":
        return ["```python", "from workbench.export import load_compact",
                f'model = load_compact("{where}")  # dense weights, bit for bit (zeros lose their sign)',
                "```"]
    lines = ["```python", "from workbench.slim import load_slimmed",
             f'model = load_slimmed("{where}").model', "```", ""]
    if info.get("sizes"):
        sizes = sorted(set(info["sizes"]))
        kept = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        lines.append(f"Kept {info.get('kind', 'unit')}s per block: {kept}; parameters "
                     f"{info.get('parameters_before', 0):,} -> {info.get('parameters_after', 0):,}.")
    if info.get("stock_loadable"):
        lines.append("Every block kept the same width, so stock `AutoModelForCausalLM.from_pretrained` "
                     "also loads it (the config carries the smaller sizes).")
    elif "stock_loadable" in info:
        lines.append("Blocks kept different widths (recorded in `config.workbench_slim`), so load it "
                     "through `workbench.slim.load_slimmed`; export with `uniform=True` for a "
                     "stock-loadable folder.")
    return lines


def loading_section(formats: dict[str, dict]) -> list[str]:
    lines = ["## Files and how to load them", "", "| format | folder | size on disk |",
             "| :--- | :--- | ---: |"]
    for fmt, info in formats.items():
        lines.append(f"| {FORMAT_TITLES.get(fmt, fmt)} | `{info.get('folder') or '.'}` | "
                     f"{_size(info.get('bytes'))} |")
    lines.append("")
    for fmt, info in formats.items():
        lines += [f"**{fmt}**", ""] + _load_snippet(fmt, info) + [""]
    if "compact" in formats:
        lines += ["The compact format stores each sparse weight as its non-zero values, a bitmask "
                  "of their positions (packed little-endian along rows) and per-row offsets, with "
                  "the tensor names of compressed-tensors' `sparse-bitmask` layout "
                  "(`<name>.weight.{shape,compressed,bitmask,row_offsets}`; 2:4 weights use "
                  "`sparse-24-bitmask`: `<name>.{shape,compressed,bitmask}`). Its weights file is "
                  "`model.compact.safetensors`, so a stock loader refuses it instead of loading "
                  "garbage; `load_compact` rebuilds the dense model.", ""]
    return lines


def speed_section(pattern: str | None, formats: dict) -> list[str]:
    lines = ["## Speed: what to expect", ""]
    pattern = (pattern or "").lower()
    if pattern in ("channel", "head") or "slimmed" in formats:
        lines.append("- Slimmed models are physically smaller matrices: fewer FLOPs and less "
                     "memory on every device and kernel, no special support needed.")
    if ":" in pattern:
        lines.append(f"- {pattern} semi-structured sparsity runs faster only with sparse kernels "
                     "on hardware that supports them (e.g. NVIDIA Ampere or newer through "
                     "`torch.sparse.to_sparse_semi_structured`, or vLLM's 2:4 kernels); with "
                     "the dense layout here it runs at dense speed.")
    if pattern == "unstructured" or not pattern:
        lines.append("- Unstructured sparsity does not speed up dense matrix kernels: the masked "
                     "model runs at the same speed as the dense one. It saves disk (compact "
                     "format) and can compress better, but speed needs a sparse runtime.")
    if "compact" in formats:
        lines.append("- The compact format saves disk and download time only; it is decompressed "
                     "to the dense layout when loaded.")
    lines.append("")
    return lines


def model_card(recipe: dict, summary: dict, table: pd.DataFrame | None = None,
               evaluation: dict | None = None, formats: dict[str, dict] | None = None,
               heatmap: str | None = None, title: str | None = None) -> str:
    """Markdown text of README.md. `formats` maps format -> {"folder", "bytes"}."""
    formats = formats or {}
    model_info = recipe.get("model") or {}
    prune = recipe.get("prune") or {}
    calib = recipe.get("calibration") or {}
    versions = recipe.get("versions") or {}
    source = model_info.get("resolved") or model_info.get("source") or "an unnamed model"
    lines = [front_matter(recipe, model_info), "",
             f"# {title or 'Pruned ' + display_name(model_info)}", ""]
    if prune:
        sparsity = prune.get("sparsity")
        pattern = prune.get("pattern")
        target = "fixed by the pattern" if pattern and ":" in str(pattern) else _fmt(sparsity, 2)
        if prune.get("budget") == "flops":
            target += " of the forward FLOPs per token"
        lines += [f"Pruned from `{source}` ({model_info.get('kind') or 'unknown source'}"
                  f"{', revision ' + str(model_info['revision']) if model_info.get('revision') else ''}"
                  f", {model_info.get('dtype') or 'fp32'}) with **{prune.get('method')}**, "
                  f"pattern **{pattern}**, target sparsity {target}, scope `{prune.get('scope')}`"
                  f"{', excluding `' + prune['exclude'] + '`' if prune.get('exclude') else ''}. "
                  "Retrain-free: no fine-tuning after pruning.", ""]
        lines += ["| setting | value |", "| :--- | :--- |"]
        for key in ("method", "pattern", "sparsity", "budget", "scope", "exclude", "nsamples",
                    "seqlen", "seed", "blocksize", "percdamp"):
            if key in prune:
                shown = "none" if prune[key] is None else _fmt(prune[key])
                lines.append(f"| {key} | {shown} |")
        if calib.get("source") == "tensor":
            lines.append(f"| calibration data | token ids passed in code (not recorded), "
                         f"{calib.get('nsamples')} x {calib.get('seqlen')} tokens |")
        elif calib:
            digest = f" (sha256 {calib['sha256'][:16]}...)" if calib.get("sha256") else ""
            lines.append(f"| calibration data | {calib.get('source')}{digest}, {calib.get('nsamples')} x "
                         f"{calib.get('seqlen')} tokens, seed {calib.get('seed')} |")
        seconds = (recipe.get("result") or {}).get("seconds")
        if seconds:
            lines.append(f"| pruning time | {seconds:.1f} s |")
        lines.append("")
    else:
        lines += [f"Exported from `{source}`. No prune config was recorded with this export; the "
                  "sparsity below is counted from its weights.", ""]
    lines += sparsity_section(summary, table)
    if heatmap:
        lines += [f"![Sparsity per block and module]({heatmap})", ""]
    lines += evaluation_section(evaluation)
    lines += loading_section(formats)
    lines += speed_section(prune.get("pattern"), formats)
    lines += ["## Reproduce", "", "`recipe.json` holds the full config, the calibration data hash "
              "and library versions. To prune again and check the masks against the recorded "
              "digest (exit status 1 when they differ), or to do that and export the result:", "",
              "```bash", "python -m workbench prune --recipe recipe.json",
              "python -m workbench export --recipe recipe.json --name reproduced", "```", "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", ""]
    return "\n".join(lines)
