"""Full-size UNets built abstractly have exactly the published parameter counts."""
import pytest

from dpo_jax.models import unet as unet_lib, unet_presets, weights
from dpo_jax.models.unet import init_abstract


@pytest.mark.parametrize("name, expected", [
    ("sd15", 859_520_964),
    ("sd21", 865_910_724),
    ("sdxl", 2_567_463_684),
])
def test_full_size_parameter_count(name, expected):
  model = unet_lib.build_unet(unet_presets.PRESETS[name])
  assert weights.count_params(init_abstract(model)) == expected
