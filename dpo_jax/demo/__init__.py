"""The embedded demo's world: captioned shapes (shapes.py), the rule that stands in for a
human rater (judge.py), and the script that trains the small base model it starts from
(base_model.py), whose output ships in base_model/."""
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
# The shipped pipeline folder that `python -m dpo_jax.demo.base_model` wrote.
BASE_MODEL = os.path.join(_HERE, "base_model")
# `shapes.split_prompts()`, one per line: the pairs' prompts and the held-out ones.
TRAIN_PROMPTS = os.path.join(_HERE, "prompts_train.txt")
HELDOUT_PROMPTS = os.path.join(_HERE, "prompts_heldout.txt")
