"""The shared half of the real-model benchmarks (benchmarks/real_model: MiniLM, benchmarks/llm: SmolLM2).

- `splits`: train / validation / test splits by group (no near-duplicate across splits), label
  balance and the majority-answer floor;
- `stats`: paired bootstrap and McNemar intervals on per-example correctness;
- `provenance`: commit and package versions recorded with every row;
- `cache`, `experts`: the expert cache (keys: recipe, split definition, data-package versions),
  the expert sets (full, full_seed1, lora, lora_aggressive, mixed) and their training loop;
- `mergekit_run`: the YAML writer and the real `mergekit-yaml` in a child process;
- `plan`: the rows (defaults, density / normalize, lambda grid) and the validation choices;
- `model`: the model side a benchmark subclasses (scoring merged models and experts);
- `runner`, `cli`: the loop that runs a plan and writes results.json, and its command line;
- `report`: results.md and accuracy.png, rendered from results.json only;
- `estimate`: the full plan's wall time from the per-merge times in a results.json;
- `env`: imported first by every script (OMP_WAIT_POLICY=PASSIVE, HF_HUB_OFFLINE=1).

A benchmark folder keeps what is model-specific: its tasks, expert training and scoring.
The one command for both: python benchmarks/run_all.py (--quick for development).
"""
