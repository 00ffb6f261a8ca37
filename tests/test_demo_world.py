"""The embedded demo's world: the procedural shapes are the sizes and places they claim, the
prompt split is the one shipped, and the 'centred' rater scores by the rule it states, also
as a scorer that `evaluate --scorer centred` loads."""
import math
import os

import numpy as np
import pytest

from dpo_jax import demo, evaluate, scorers
from dpo_jax.demo import judge, shapes
from dpo_jax.errors import UserError

R = shapes.RESOLUTION
# Centres of the pixel-centre lattice's symmetry: every multiple of 1/8 px. The 4×4
# subsamples sit at (k + ½)/4, so a shape symmetric about such a centre covers a symmetric set
# of them.
EIGHTH_CENTRES = ((16.0, 16.0), (13.375, 18.625), (10.5, 21.25), (20.125, 12.875))


def _alpha(image: np.ndarray, colour: str) -> np.ndarray:
  """float64 [H, W]: each pixel's coverage, undone from the blend with the white background,
  through the channel where the colour differs most from white (215 or more levels)."""
  rgb = np.float64(shapes.COLOURS[colour])
  channel = int(np.argmax(255 - rgb))
  return (255.0 - image[..., channel]) / (255.0 - rgb[channel])


def _centroid(alpha: np.ndarray) -> tuple[float, float]:
  """(x, y) of the coverage, pixel i's centre being i + ½."""
  y, x = np.mgrid[0:alpha.shape[0], 0:alpha.shape[1]] + 0.5
  return float((alpha * x).sum() / alpha.sum()), float((alpha * y).sum() / alpha.sum())


def _block(top: int, left: int, size: int, *, background=(255, 255, 255),
           colour=(40, 80, 220), resolution: int = R) -> np.ndarray:
  """A hand-made image: a solid size×size block whose top-left pixel is (left, top)."""
  image = np.empty((resolution, resolution, 3), np.uint8)
  image[:] = background
  image[top:top + size, left:left + size] = colour
  return image


# --- shapes -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", list(shapes.SIZES))
@pytest.mark.parametrize("colour", ["red", "yellow"])
def test_shapes_cover_their_geometric_areas(size, colour):
  """Drawn at the canvas centre, the coverage adds up to the shapes' areas: π r² for the
  circle, (2 · 0.85 r)² for the square, and ½ · 2r · 1.8r = 1.8 r² for the triangle (apex r
  above the centre, a base 2r wide 0.8 r below it). Within 1%: the 4×4 subsamples count lattice
  points of the shape, off by a few subpixels (1/16 px² each) along the rim, under 1% of these
  areas; the uint8 blend adds at most 0.5/215 per rim pixel."""
  r = shapes.SIZES[size]
  areas = {"circle": math.pi * r * r, "square": (2 * 0.85 * r) ** 2, "triangle": 1.8 * r * r}
  for shape, area in areas.items():
    image = shapes.draw(f"a {size} {colour} {shape}", (R / 2, R / 2))
    assert image.shape == (R, R, 3) and image.dtype == np.uint8
    assert _alpha(image, colour).sum() == pytest.approx(area, rel=0.01), shape


def test_square_coverage_is_the_subsample_count_derived_by_hand():
  """The square's edges fall on the subsample grid predictably: at the centre 16 the large
  square spans 16 ± 7.225, holding the subsamples 8.875 .. 23.125, 58 of them a side, so its
  coverage is (58/4)² = 210.25 px² exactly (the true area is 208.8); the small one spans 16 ±
  4.25, holding 11.875 .. 20.125, 34 a side: (34/4)² = 72.25 = (2 · 4.25)²."""
  large = _alpha(shapes.draw("a large green square", (16, 16)), "green").sum()
  small = _alpha(shapes.draw("a small green square", (16, 16)), "green").sum()
  # Only the rim pixels are rounded, by at most 0.5/215 each (green is 215 levels from white
  # in red).
  assert large == pytest.approx(210.25, abs=0.1)
  assert small == pytest.approx(72.25, abs=0.1)


@pytest.mark.parametrize("prompt", ["a large red circle", "a small blue circle",
                                    "a large green square", "a small yellow square"])
def test_draw_puts_a_symmetric_shapes_centroid_where_asked(prompt):
  """At a centre on the 1/8 px lattice the subsamples a circle or square covers are symmetric
  about it, so the only error left is binning them into pixels: a partial column (row) of k
  subsamples is at most k(4 - k)/32 ≤ 1/8 px² off, at two ends of a shape at least 8.5 px
  wide: ≤ 0.03 px. At any centre the subsample grid moves each edge by up to 1/4 px, the
  centroid by up to 1/8 px more: ≤ 0.16 px."""
  colour = shapes.parse(prompt)[1]
  for centre in EIGHTH_CENTRES:
    x, y = _centroid(_alpha(shapes.draw(prompt, centre), colour))
    assert abs(x - centre[0]) < 0.05 and abs(y - centre[1]) < 0.05, (centre, x, y)
  rng = np.random.default_rng(1)
  for _ in range(50):
    centre = shapes.random_centre(prompt, rng)
    x, y = _centroid(_alpha(shapes.draw(prompt, centre), colour))
    assert abs(x - centre[0]) < 0.16 and abs(y - centre[1]) < 0.16, (centre, x, y)


@pytest.mark.parametrize("size", list(shapes.SIZES))
def test_triangle_centroid_is_a_fifth_of_its_half_width_below_the_centre(size):
  """The triangle's vertices are (cx, cy - r), (cx ± r, cy + 0.8 r): their mean, the centroid,
  is (cx, cy + 0.2 r), so the rater's centroid of a triangle drawn at `centre` sits 0.2 r
  below it (1 px for a small one, 1.7 px for a large one). In x it is symmetric, as above
  (< 0.05 px on the 1/8 lattice). In y the base, 2r wide and 0.6 r from the centroid, lands
  on the subsample grid up to 1/4 px off, which moves the centroid by up to
  2r · ¼ · 0.6r / 1.8r² = 1/6 px (the slanted edges' errors are smaller and partly cancel)."""
  r = shapes.SIZES[size]
  for centre in EIGHTH_CENTRES:
    x, y = _centroid(_alpha(shapes.draw(f"a {size} purple triangle", centre), "purple"))
    assert x == pytest.approx(centre[0], abs=0.05)
    assert y == pytest.approx(centre[1] + 0.2 * r, abs=1 / 6)
  rng = np.random.default_rng(2)
  for _ in range(50):
    centre = shapes.random_centre(f"a {size} purple triangle", rng)
    _, y = _centroid(_alpha(shapes.draw(f"a {size} purple triangle", centre), "purple"))
    assert y == pytest.approx(centre[1] + 0.2 * r, abs=1 / 6)


@pytest.mark.parametrize("prompt", ["a large red circle", "a large blue square",
                                    "a large orange triangle", "a small green triangle"])
def test_random_centre_keeps_the_whole_shape_inside(prompt):
  """Over many draws the outermost pixel ring stays pure background (so the convex shape lies
  strictly inside the canvas) and the positions reach across the allowed range [r + 1,
  R - r - 1] rather than clustering."""
  r = shapes.SIZES[shapes.parse(prompt)[0]]
  rng = np.random.default_rng(0)
  centres = np.array([shapes.random_centre(prompt, rng) for _ in range(300)])
  assert centres.min() >= r + 1 and centres.max() <= R - r - 1
  assert (centres.max(axis=0) - centres.min(axis=0) > 0.9 * (R - 2 * r - 2)).all()
  for centre in centres:
    image = shapes.draw(prompt, tuple(centre))
    ring = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    assert (ring == 255).all(), centre
    assert (image != 255).any()


def test_split_prompts_holds_out_every_fourth_caption():
  """27 training and 9 held-out captions, disjoint, together all 36 = 2 sizes × 6 colours ×
  3 shapes; the held-out ones are all_prompts()[3::4]."""
  train, heldout = shapes.split_prompts()
  every = shapes.all_prompts()
  assert len(every) == len(set(every)) == 36
  assert (len(train), len(heldout)) == (27, 9)
  assert not set(train) & set(heldout)
  assert sorted(train + heldout) == sorted(every)
  assert heldout == every[3::4]


def test_shipped_prompt_files_are_the_split():
  """dpo_jax/demo/prompts_train.txt and prompts_heldout.txt, which configs/demo.py trains and
  reports on, hold split_prompts() line by line."""
  train, heldout = shapes.split_prompts()
  for path, expected in ((demo.TRAIN_PROMPTS, train), (demo.HELDOUT_PROMPTS, heldout)):
    assert os.path.basename(path) in ("prompts_train.txt", "prompts_heldout.txt")
    with open(path, encoding="utf-8") as f:
      assert f.read().splitlines() == expected, path


def test_parse_round_trips_every_prompt():
  for prompt in shapes.all_prompts():
    size, colour, shape = shapes.parse(prompt)
    assert size in shapes.SIZES and colour in shapes.COLOURS and shape in shapes.SHAPES
    assert f"a {size} {colour} {shape}" == prompt
  assert shapes.parse("a small red circle") == ("small", "red", "circle")


# --- judge ------------------------------------------------------------------------------

HALF_DIAGONAL = math.hypot(R / 2, R / 2)


def test_centred_shapes_score_one():
  """A square or circle drawn at the canvas centre covers a set of pixels symmetric about it:
  centroid distance 0, score 1."""
  assert judge.centredness(shapes.draw("a large red square", (16, 16))) == 1.0
  assert judge.centredness(shapes.draw("a small blue circle", (16, 16))) == 1.0
  assert judge.centredness(_block(12, 12, 8)) == 1.0  # Pixels 12..19: centres 12.5..19.5.


def test_off_centre_score_is_one_minus_the_fraction_of_the_half_diagonal():
  """A 4×4 block at pixels 6..9 has its pixel centres' mean at (8, 8): 1 - hypot(8, 8) /
  hypot(16, 16) = 0.5. The small square drawn at (8, 8) spans 3.75 .. 12.25 and marks pixels
  3..12 (the rim ones a quarter covered, 0.25 · 215 = 54 > 48 levels): mean 8 again."""
  assert judge.centredness(_block(6, 6, 4)) == pytest.approx(0.5, abs=1e-12)
  assert judge.centredness(shapes.draw("a small red square", (8, 8))) == pytest.approx(
      0.5, abs=1e-12)
  # (x, y) = (24, 12): 1 - hypot(8, -4)/hypot(16, 16), by a 2×2 block at pixels 23..24, 11..12.
  assert judge.centredness(_block(11, 23, 2)) == pytest.approx(
      1 - math.hypot(8, 4) / HALF_DIAGONAL, abs=1e-12)


def test_blank_or_nearly_blank_canvas_scores_zero():
  """No subject (or fewer than MIN_PIXELS = 4 pixels of one) scores 0, below any shape."""
  assert judge.centredness(np.full((R, R, 3), 255, np.uint8)) == 0.0
  assert judge.centredness(np.zeros((R, R, 3), np.uint8)) == 0.0
  three = _block(16, 16, 1)
  three[16, 17] = three[17, 16] = (40, 80, 220)
  assert judge.centredness(three) == 0.0
  # Differing by THRESHOLD = 48 levels or less is background.
  assert judge.centredness(_block(6, 6, 4, colour=(255 - 48, 255, 255))) == 0.0
  assert judge.centredness(_block(6, 6, 4, colour=(255 - 49, 255, 255))) == pytest.approx(0.5)


def test_background_is_taken_from_the_border():
  """On black or a colour, the subject is what differs from the border's median colour, not
  from white: the same (8, 8) block still scores 0.5; a white block on black too."""
  assert judge.centredness(_block(6, 6, 4, background=(0, 0, 0))) == pytest.approx(0.5)
  assert judge.centredness(_block(6, 6, 4, background=(0, 0, 0), colour=(255, 255, 255))
                           ) == pytest.approx(0.5)
  assert judge.centredness(_block(6, 6, 4, background=(30, 120, 200),
                                  colour=(220, 40, 40))) == pytest.approx(0.5)
  # A subject on a coloured canvas at the centre scores 1, not the canvas' own centroid.
  assert judge.centredness(_block(12, 12, 8, background=(30, 120, 200),
                                colour=(220, 40, 40))) == 1.0


@pytest.mark.parametrize("prompt", ["a large red circle", "a small green square",
                                    "a large blue triangle"])
def test_nearer_the_centre_always_scores_higher(prompt):
  """Whole-pixel shifts move the subject's pixels, hence its centroid, by exactly the shift:
  along the x axis (and along the diagonal) the score falls strictly with the distance."""
  r = shapes.SIZES[shapes.parse(prompt)[0]]
  reach = int(R / 2 - r - 1)
  for direction in ((1, 0), (-1, 0), (1, 1)):
    scores = [judge.centredness(shapes.draw(prompt, (16 + d * direction[0],
                                                     16 + d * direction[1])))
              for d in range(reach + 1)]
    assert all(a > b for a, b in zip(scores, scores[1:])), (direction, scores)
    if shapes.parse(prompt)[2] != "triangle" and direction == (1, 0):
      expected = [1 - d / HALF_DIAGONAL for d in range(reach + 1)]
      np.testing.assert_allclose(scores, expected, atol=1e-12)


def test_centred_judge_is_a_batch_scorer():
  """`CentredJudge()(images, prompts)`: float32 (N,), the centredness of each image, prompts
  optional (the rule ignores them)."""
  images = np.stack([shapes.draw("a large red square", (16, 16)), _block(6, 6, 4),
                     np.full((R, R, 3), 255, np.uint8)])
  for scores in (judge.CentredJudge()(images, ["a", "b", "c"]), judge.CentredJudge()(images)):
    assert scores.dtype == np.float32 and scores.shape == (3,)
    np.testing.assert_array_equal(scores, np.float32([1.0, 0.5, 0.0]))
  assert judge.CentredJudge().devices == 1
  assert judge.CentredJudge()(list(images)).shape == (3,)
  # Floats in [0, 1], as the model scorers take them, score as the uint8 images they round to.
  np.testing.assert_array_equal(judge.CentredJudge()(images / 255.0), np.float32([1, 0.5, 0]))


# --- the rule as a scorer ---------------------------------------------------------------


def test_centred_is_a_scorer_spec_without_a_folder():
  assert evaluate.parse_scorer("centred") == ("centred", {"folder": None})
  assert "centred" in scorers.RULE_KINDS


def test_load_scorer_centred_scores_like_the_rule():
  scorer = scorers.load_scorer(None, "centred")
  rng = np.random.default_rng(3)
  images, captions = shapes.captioned_batch(rng, 6)
  np.testing.assert_array_equal(scorer(images, captions),
                                np.float32([judge.centredness(i) for i in images]))
  assert scorer.devices == 1


def test_a_rule_reads_no_files_and_a_model_scorer_needs_its_folder():
  with pytest.raises(UserError, match="rule and reads no model files"):
    scorers.load_scorer("/some/folder", "centred")
  kind, options = evaluate.parse_scorer("centred=/some/folder")
  with pytest.raises(UserError, match="rule"):
    scorers.load_scorer(options.pop("folder"), kind, **options)
  with pytest.raises(UserError, match="needs its model folder: pickscore=FOLDER"):
    scorers.load_scorer(None, "pickscore")
  with pytest.raises(UserError, match="KIND=FOLDER"):
    evaluate.parse_scorer("pickscore")
  with pytest.raises(UserError, match="not one of"):
    scorers.load_scorer(None, "centered")
