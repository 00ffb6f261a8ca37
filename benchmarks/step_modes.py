"""The train step's rate in each mode, one process, one config: live reference (shared and
separate passes), precomputed reference errors, LoRA, and the reference-free MaPO.

  python benchmarks/step_modes.py [--config configs/synthetic.py] [--steps 20] \
      [--config.KEY=VALUE ...]

Prints a markdown table (pairs/s, step ms, model and XLA GFLOP per step, XLA's peak memory
estimate, and each mode's rate over the live separate pass's) and, last, one JSON line.
Every mode times `dpo_jax.bench.bench`, i.e. `train.build_program`'s step.
"""
import json

from absl import flags

from dpo_jax import bench, cli

MODES = {
    "live, shared pass": dict(config={"dpo.reference_pass": "shared"}),
    "live, separate passes": dict(config={"dpo.reference_pass": "separate"}),
    "precomputed reference": dict(config={"dpo.reference_pass": "separate"},
                                  reference="precomputed"),
    "LoRA r=8 (attention), separate": dict(config={"dpo.reference_pass": "separate",
                                                   "lora.enabled": True, "lora.rank": 8}),
    "MaPO (no reference)": dict(config={"dpo.loss": "mapo", "optim.peak_lr": 1e-5}),
}
_BASELINE = "live, separate passes"


def _with(config, overrides: dict):
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def main() -> None:
  config = cli.define_config_flag()
  steps = flags.DEFINE_integer("steps", 20, "Timed steps per mode.")

  def command(argv):
    del argv
    results = {}
    for name, mode in MODES.items():
      results[name] = bench.bench(_with(config.value, mode["config"]), steps=steps.value,
                                  reference=mode.get("reference", "live"))
      print(f"{name}: {results[name]['pairs_per_sec']:.1f} pairs/s", flush=True)
    baseline = results[_BASELINE]["pairs_per_sec"]
    print("| mode | pairs/s | step (ms) | model GFLOP/step | XLA GFLOP/step | "
          "XLA peak memory (MB) | rate / live separate |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
      print(f"| {name} | {r['pairs_per_sec']:.1f} | {1e3 * r['step_seconds']:.1f} | "
            f"{r['model_flops_per_step'] / 1e9:.2f} | {r['flops_per_step'] / 1e9:.2f} | "
            f"{r['peak_bytes_per_device'] / 2**20:.0f} | "
            f"{r['pairs_per_sec'] / baseline:.2f} |")
    print(json.dumps({name: {k: r[k] for k in ("pairs_per_sec", "step_seconds",
                                                "flops_per_step", "model_flops_per_step",
                                                "peak_bytes_per_device")}
                      for name, r in results.items()}))

  cli.run(command)


if __name__ == "__main__":
  main()
