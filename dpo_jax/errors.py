"""The one exception type that means "the user gave us something we cannot use".

Every command (`cli.run`: main, prepare, export) turns it into one line on stderr and exit
status 2, so every message must name the problem and the fix in a single sentence.
"""


class UserError(Exception):
  """A mistake in a user's input (path, config value, model folder) with a one-line fix."""
