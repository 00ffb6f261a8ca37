"""`dpo_jax.sample`: the batched, sharded generator against diffusers' pipeline, per-image
seeds independent of the batch, the prompt files it reads, and the command line."""
import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import subprocesses
import tiny_models
from dpo_jax import encode, sample, sampler
from dpo_jax.data import prompts as prompts_lib
from dpo_jax.errors import UserError
from dpo_jax.models import pipeline as pipeline_lib, vae as vae_lib

PROMPTS = ["a photo of a cat", "photo", "a cat"]
STEPS = 4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  torch_pipe = tiny_models.make_pipeline("sd")
  torch_pipe.scheduler = diffusers.DDIMScheduler.from_config(torch_pipe.scheduler.config,
                                                             clip_sample=False)
  folder = str(tmp_path_factory.mktemp("sd") / "pipeline")
  torch_pipe.save_pretrained(folder, safe_serialization=True)
  pipe = pipeline_lib.load_pipeline(folder)
  return torch_pipe, folder, pipe, sample.make_generator(pipe, pipe.unet_params, steps=STEPS,
                                                         batch=2)


def test_images_equal_the_diffusers_pipeline_to_one_level(saved):
  torch_pipe, _, pipe, generate = saved
  seeds = [5, 6, 7]
  ours = generate(PROMPTS, seeds)  # Two batches of 8 rows (8 fake devices), the last padded.
  assert ours.dtype == np.uint8 and ours.shape == (3, 32, 32, 3)
  latents = sampler.initial_noise(jnp.asarray(seeds), (16, 16, 4))
  with torch.no_grad():
    theirs = torch_pipe(PROMPTS, height=32, width=32, num_inference_steps=STEPS,
                        guidance_scale=7.5, output_type="np",
                        latents=torch.from_numpy(np.array(latents)).permute(0, 3, 1, 2)).images
  theirs = (theirs * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil.
  # Float32 sums in another order can move a value across a rounding boundary: one level.
  assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
  assert np.abs(ours[0].astype(int) - ours[1].astype(int)).max() > 20  # Not near-constant.


def test_an_image_depends_on_its_prompt_and_seed_only(saved):
  *_, generate = saved
  together = generate(PROMPTS, [5, 6, 7])
  alone = generate([PROMPTS[2]], [7])  # Another row, other neighbours, another batch.
  np.testing.assert_array_equal(alone[0], together[2])


def test_sdedit_equals_diffusers_img2img_to_one_level(saved, monkeypatch):
  """The generator's SDEdit draws image i's posterior sample from fold_in(key(seed_i), 1)
  and its noise from seed_i: handed the same draws, diffusers' img2img agrees."""
  torch_pipe, _, pipe, _ = saved
  seeds, strength = [1, 2], 0.5
  start = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  ours = sample.make_generator(pipe, pipe.unet_params, steps=STEPS, batch=2,
                               strength=strength)(PROMPTS[:2], seeds, start)

  mean, logvar = encode.encode_images(pipe.vae, pipe.vae_params, jnp.asarray(start))
  posterior = jnp.stack([vae_lib.sample_latents(m, lv, jax.random.fold_in(jax.random.key(s), 1))
                         for m, lv, s in zip(mean, logvar, seeds, strict=True)])
  noise = sampler.initial_noise(jnp.asarray(seeds), (16, 16, 4))
  nchw = lambda x: torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()
  module = diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img
  monkeypatch.setattr(module, "retrieve_latents", lambda *a, **k: nchw(posterior))
  monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: nchw(noise))
  with torch.no_grad():
    theirs = diffusers.StableDiffusionImg2ImgPipeline(**torch_pipe.components)(
        PROMPTS[:2], image=nchw(start), strength=strength, num_inference_steps=STEPS,
        guidance_scale=7.5, output_type="np").images
  theirs = (theirs * 255).round().astype(np.uint8)
  assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_prompt_files_in_their_published_formats(tmp_path):
  (tmp_path / "a.txt").write_text("a cat\n\n a dog \n")
  assert prompts_lib.read_prompts(str(tmp_path / "a.txt")) == ["a cat", " a dog "]
  (tmp_path / "b.jsonl").write_text('{"prompt": "x"}\n{"caption": "y"}\n')
  assert prompts_lib.read_prompts(str(tmp_path / "b.jsonl")) == ["x", "y"]
  (tmp_path / "c.json").write_text(json.dumps({"anime": ["p", "q"], "photo": ["r"]}))
  assert prompts_lib.read_prompts(str(tmp_path / "c.json")) == ["p", "q", "r"]
  (tmp_path / "d.tsv").write_text("Prompt\tCategory\tChallenge\nbird\tAnimals\tBasic\n")
  assert prompts_lib.read_prompts(str(tmp_path / "d.tsv")) == ["bird"]
  for bad, text, words in (("e.json", '{"a": 1}', "cannot read"), ("f.tsv", "x\ty\n", "Prompt"),
                           ("g.txt", "\n\n", "holds no prompts")):
    (tmp_path / bad).write_text(text)
    with pytest.raises(UserError, match=words):
      prompts_lib.read_prompts(str(tmp_path / bad))
  with pytest.raises(UserError, match="does not exist"):
    prompts_lib.read_prompts(str(tmp_path / "missing.txt"))


@pytest.mark.slow
def test_command_writes_paired_images(saved, tmp_path):
  _, folder, _, generate = saved
  (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
  done = subprocesses.run_module(
      "dpo_jax.sample", f"--pretrained={folder}", f"--prompts={tmp_path / 'prompts.txt'}",
      f"--output={tmp_path / 'out'}", f"--steps={STEPS}", "--seed=5", "--batch=2")
  assert done.returncode == 0, done.stderr[-2000:]
  lines = (tmp_path / "out" / "images.jsonl").read_text().splitlines()
  index = [json.loads(line) for line in lines]
  assert [(r["prompt"], r["seed"]) for r in index] == list(zip(PROMPTS, [5, 6, 7], strict=True))
  written = np.stack([np.asarray(Image.open(tmp_path / "out" / r["file"])) for r in index])
  # One device in the subprocess, 8 here, optimisations off there: still within a level.
  assert np.abs(written.astype(int) - generate(PROMPTS, [5, 6, 7]).astype(int)).max() <= 1
  both = subprocesses.run_module("dpo_jax.sample", f"--pretrained={folder}",
                                 f"--workdir={tmp_path}", f"--prompts={tmp_path / 'prompts.txt'}",
                                 f"--output={tmp_path / 'x'}")
  assert both.returncode == 2 and "exactly one of --workdir" in both.stderr
