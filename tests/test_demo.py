"""The embedded demo: the shipped base model is a diffusers pipeline that draws what it is
asked, the script that made it writes such a pipeline, and the demo runs end to end through
the real command, reduced in size (the full-size figures are in the README)."""
import json
import os

import numpy as np
import pytest

import subprocesses
from dpo_jax import demo
from dpo_jax.demo import judge, shapes


def _colour_of_subject(image: np.ndarray) -> str | None:
  """The named colour nearest the subject's mean colour, or None when nothing is drawn."""
  mask = judge.subject_mask(image)
  if mask.sum() < 10:
    return None
  mean = image[mask].astype(np.float64).mean(axis=0)
  return min(shapes.COLOURS, key=lambda name: np.sum((mean - shapes.COLOURS[name]) ** 2))


def test_shipped_base_model_draws_the_prompted_colour():
  """Every held-out prompt, three seeds: a subject is drawn, in the prompt's colour."""
  from dpo_jax import sample
  from dpo_jax.models import pipeline
  pipe = pipeline.load_pipeline(demo.BASE_MODEL)
  generate = sample.make_generator(pipe, pipe.unet_params, steps=10, guidance_scale=3.0,
                                   batch=27)
  _, prompts = shapes.split_prompts()
  prompts = prompts * 3
  images = generate(prompts, list(range(len(prompts))))
  assert images.shape == (27, 32, 32, 3)
  colours = [_colour_of_subject(image) for image in images]
  right = sum(c == shapes.parse(p)[1] for c, p in zip(colours, prompts))
  assert right >= 0.85 * len(prompts), list(zip(prompts, colours))
  # Where it draws varies with the seed (the rule has something to choose between).
  scores = judge.CentredJudge()(images)
  assert scores.std() > 0.03, scores


def test_shipped_base_model_equals_diffusers():
  """diffusers and transformers load the shipped folder as a StableDiffusionPipeline, and
  its UNet, VAE decoder and text encoder compute what ours do."""
  import diffusers
  import jax.numpy as jnp
  import torch

  from dpo_jax.models import pipeline
  torch_pipe = diffusers.StableDiffusionPipeline.from_pretrained(demo.BASE_MODEL)
  pipe = pipeline.load_pipeline(demo.BASE_MODEL)
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
  ids = torch_pipe.tokenizer(["a small red circle", ""], padding="max_length",
                             max_length=torch_pipe.tokenizer.model_max_length,
                             return_tensors="np")["input_ids"]
  with torch.no_grad():
    context_torch = torch_pipe.text_encoder(torch.from_numpy(ids))[0]
    noise_torch = torch_pipe.unet(torch.from_numpy(latents.transpose(0, 3, 1, 2)),
                                  torch.tensor([500, 20]), context_torch).sample
    image_torch = torch_pipe.vae.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))).sample
  (text_module, text_params), = pipe.text_encoders
  context = text_module.apply({"params": text_params}, jnp.asarray(ids)).last_hidden_state
  np.testing.assert_allclose(context, context_torch.numpy(), atol=1e-5)
  noise = pipe.unet.apply({"params": pipe.unet_params}, jnp.asarray(latents),
                          jnp.asarray([500, 20]), context)
  np.testing.assert_allclose(noise, noise_torch.numpy().transpose(0, 2, 3, 1), atol=1e-4)
  image = pipe.vae.apply({"params": pipe.vae_params}, jnp.asarray(latents),
                         method=pipe.vae.decode)
  np.testing.assert_allclose(image, image_torch.numpy().transpose(0, 2, 3, 1), atol=1e-4)


# The shipped base model is checked above; this checks the script that remakes it. Two models
# trained, over a minute of CPU: `make test-all` runs it, CI's `make test` does not.
@pytest.mark.slow
@pytest.mark.expensive
def test_base_model_script_writes_a_pipeline_diffusers_loads(tmp_path):
  """`python -m dpo_jax.demo.base_model` (two steps of each model) writes a folder that
  diffusers loads and that our pipeline loader and sampler read."""
  out = tmp_path / "base"
  result = subprocesses.run_module("dpo_jax.demo.base_model", f"--output={out}",
                                   "--vae_steps=2", "--unet_steps=2", "--batch=4")
  assert result.returncode == 0, result.stderr[-3000:]
  import diffusers

  from dpo_jax.models import pipeline
  torch_pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(out))
  assert isinstance(torch_pipe.scheduler, diffusers.DDIMScheduler)
  pipe = pipeline.load_pipeline(str(out))
  assert pipe.kind == "sd" and pipe.vae.config.downscale_factor == 2
  # The scaling factor is measured: 1 / the std of the trained VAE's latents, not 1.
  assert pipe.vae.config.scaling_factor != 1.0
  tokenizer = pipe.tokenizers[0]
  for word in {w for p in shapes.all_prompts() for w in p.split()}:
    assert len(tokenizer(word)["input_ids"]) == 3, word  # BOS, the word, EOS.


@pytest.mark.slow
def test_demo_runs_end_to_end_reduced(tmp_path):
  """The README's first command, reduced in size: `python -m dpo_jax.main` with no --config
  draws pairs from the shipped base, trains, and ends with the report and its summary; the
  evaluator's --report writes the same numbers again from the checkpoint."""
  small = ["--config.data.sampled.pairs_per_prompt=1",
           "--config.data.sampled.heldout_pairs_per_prompt=1", "--config.data.sampled.steps=4",
           "--config.train.steps=4", "--config.train.batch_pairs=4", "--config.train.log_every=2",
           "--config.eval.report_images_per_prompt=2", "--config.eval.sample_steps=4",
           "--config.eval.draws=1"]
  result = subprocesses.run_module("dpo_jax.main", f"--workdir={tmp_path}", *small)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert "win rate" in lines[-3] and "implicit reward accuracy" in lines[-2]
  assert "samples_before_after.png" in lines[-1] and "curves.png" in lines[-1]
  assert "pairs: 27 pairs of 27 prompts" in result.stdout
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["judge"] == "centred" and report["images"] == 18 and report["prompts"] == 9
  low, high = report["win_rate_ci95"]
  assert 0 <= low <= report["win_rate"] <= high <= 1
  assert report["pairs"] <= 9 and 0 <= report["implicit_acc"] <= 1
  from PIL import Image
  grid = Image.open(tmp_path / "samples_before_after.png")
  assert grid.size[1] == 2 * 96 + 6  # Two rows of 32-px images enlarged 3×, a 6-px gap.
  assert Image.open(tmp_path / "curves.png").size[0] > 0
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["data"]["format"] == "pickapic"  # The drawn pairs, read as files.
  again = subprocesses.run_module("dpo_jax.evaluate", f"--workdir={tmp_path}", "--report")
  assert again.returncode == 0, again.stderr[-3000:]
  rewritten = json.loads((tmp_path / "report.json").read_text())
  assert rewritten["win_rate"] == report["win_rate"]
  assert rewritten["implicit_acc"] == report["implicit_acc"]
  assert os.path.exists(tmp_path / "report.md")
