"""Peak memory of a perplexity evaluation: 49k vs 262k vocabulary, chunked LM head vs full logits.

Each measurement runs in a fresh subprocess (peak RSS, `ru_maxrss`, is per process): a random
Llama-shaped model (hidden 64, 2 blocks) is built, its RSS noted, then 8 windows of 512 tokens
are scored either by `workbench.evaluate.perplexity` (LM head in bounded chunks) or by the full
`model(ids).logits` of the batch (what evaluation did before). Reports the peak RSS above the
model's own. One JSON line last.

    python bench/eval_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, torch, transformers as T
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from conftest import char_tokenizer
from workbench.evaluate import perplexity
vocab, mode = {vocab}, {mode!r}
torch.manual_seed(0)
config = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab)
model = T.AutoModelForCausalLM.from_config(config).eval()
tokenizer = char_tokenizer()
text = ("the quick brown fox jumps over the lazy dog " * 120)[: 8 * 512 + 1]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.inference_mode():
    if mode == "chunked":
        value = perplexity(model, tokenizer, text, seqlen=512, batch_size=8, limit=8)["perplexity"]
    else:
        ids = torch.tensor(tokenizer(text).input_ids[: 8 * 512]).view(8, 512)
        logits = model(ids).logits
        value = float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(),
                                                        ids[:, 1:].reshape(-1)).exp())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"vocab": vocab, "mode": mode, "model_rss_mb": base / 1024, "eval_peak_above_model_mb":
                  (peak - base) / 1024, "perplexity": value}}))
"""


def main() -> None:
    rows = []
    for vocab in (49_152, 262_144):
        for mode in ("chunked", "full"):
            code = CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"), vocab=vocab, mode=mode)
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"vocab {vocab:>7}  {mode:<8} model {rows[-1]['model_rss_mb']:7.0f} MB  "
                  f"evaluation peak above it {rows[-1]['eval_peak_above_model_mb']:7.0f} MB  "
                  f"ppl {rows[-1]['perplexity']:.2f}")
    print(json.dumps({"rows": rows, "loadavg": Path("/proc/loadavg").read_text().split()[:3]}))


if __name__ == "__main__":
    main()
