"""The embedded demo (`make demo`; `python -m dpo_jax.main` with no --config): Diffusion-DPO
changes what a small model draws, on a laptop CPU in a few minutes, with nothing to download.

1. The base model: a small 32-pixel pipeline that draws "a {small|large} {colour}
   {circle|square|triangle}" anywhere on a white canvas (dpo_jax/demo/base_model.py trained
   it; the repo ships it in dpo_jax/demo/base_model/).
2. Pairs: it draws two images per prompt, many times over (data.format='sampled'), and a
   rule stands in for a human rater: it prefers the image whose shape sits nearer the centre
   (the 'centred' scorer, dpo_jax/demo/judge.py).
3. Diffusion-DPO on those pairs: the same trainer, step and loss as configs/sd15.py.
4. The report (eval.report): win rate of the tuned model against the base on held-out
   prompts, paired seeds, judged by the same rule; samples_before_after.png; curves.png.
"""
from dpo_jax import default_config
from dpo_jax import demo


def get_config():
  config = default_config.get_config()
  config.model.pretrained = demo.BASE_MODEL
  config.data.resolution = 32
  config.data.format = "sampled"
  config.data.sampled.prompts = demo.TRAIN_PROMPTS  # 27 prompts.
  config.data.sampled.pairs_per_prompt = 24
  config.data.sampled.heldout_prompts = demo.HELDOUT_PROMPTS  # 9 prompts never trained on.
  config.data.sampled.heldout_pairs_per_prompt = 8
  config.data.sampled.judge = "centred"
  config.data.sampled.steps = 20
  config.data.sampled.guidance = 3.0
  config.train.steps = 400
  config.train.batch_pairs = 16
  config.train.log_every = 10
  config.train.ckpt_every = 1000  # Saved at the end only.
  config.dpo.beta = 5000.0
  # 5× this step wins too, by smearing paint around the centre: the rule only sees a
  # centroid (README). This one keeps the shapes clean.
  config.optim.peak_lr = 2e-5
  config.eval.report = True
  config.eval.prompts = demo.HELDOUT_PROMPTS
  config.eval.report_images_per_prompt = 24
  config.eval.report_batch = 64
  config.eval.scorers = "centred"
  config.eval.sample_steps = 20
  config.eval.guidance = 3.0
  return config
