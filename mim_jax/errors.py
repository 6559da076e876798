"""The errors a user can fix: bad config values, missing or unreadable files,
bad data, a busy workdir.

Validators and loaders raise these, and only these mean "the user's input
is wrong": the CLI (`mim_jax.main`) prints them as one line naming the
field or file and the fix. Every other exception, a `ValueError` from model
code included, is a bug and prints its traceback.

Each type also derives from the builtin its callers have always caught
(`ConfigError` is a `ValueError`, `MissingFileError` a
`FileNotFoundError`), so `except ValueError` around a validator keeps
working.
"""


class UserError(Exception):
  """Base of the errors in the user's input (printed as one line)."""


class ConfigError(UserError, ValueError):
  """A config value is wrong or two values disagree; the message names the
  field (`--config.a.b`) and the fix."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder the config names does not exist."""


class WeightsFileError(UserError, ValueError):
  """A weights file (.pth, .npz, .safetensors, a workdir's checkpoint)
  cannot be read or does not fit the model."""


class DataError(UserError, ValueError):
  """The data source is unusable: an unknown source, an empty or bad
  folder, an undecodable image the config says to stop at."""


class WorkdirError(UserError, ValueError):
  """The workdir cannot be used: another run owns it, or it holds a run of
  another model."""


def is_user_error(e: BaseException) -> bool:
  """Whether the CLI prints `e` as one line (see the module docstring)."""
  return isinstance(e, UserError)
