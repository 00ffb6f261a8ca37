"""Checkpoints in WORKDIR/checkpoints: train state, data position and config, saved together.

Orbax writes asynchronously (training continues while the arrays are written) and atomically
(a step's folder appears only once complete), keeps the newest `keep` steps, and each host
writes only its own shards. Restoring takes the newest complete step, so re-running the same
command resumes where the last run stopped, on the same data.
"""
import dataclasses
import os

import jax
import orbax.checkpoint as ocp

from dpo_jax.errors import UserError


class Checkpointer:

  def __init__(self, workdir: str, *, every: int, keep: int = 3):
    # Every `every` steps and nothing else: orbax's default policy would also save the first
    # step of a fresh run (a full SDXL state written at step 1).
    policy = ocp.checkpoint_managers.FixedIntervalPolicy(every)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                           save_decision_policy=policy)
    self._manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                                          options=options, item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def due(self, step: int) -> bool:
    """Whether `save(step)` would save (every N steps), so callers gather its data only then."""
    return self._manager.should_save(step)

  def save(self, step: int, state, data_state: dict, config: dict, *, force: bool = False) -> bool:
    """Saves when `step` is due (every N) or `force`; returns whether it saved."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state),
                              config=ocp.args.JsonSave(config))
    return self._manager.save(step, args=args, force=force)

  def restore(self, step: int, abstract_state):
    """(state, data_state) of `step`, laid out like `abstract_state` (shapes and shardings).

    A state field that the checkpoint predates (its writer had no such field, e.g. the
    non-finite step counts) keeps its value in `abstract_state`: the run's initial one.
    """
    fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
    try:
      saved = self._state_tree(step) or fields
      target = {name: value for name, value in fields.items() if name in saved}
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as error:
      where = os.path.join(str(self._manager.directory), str(step))
      raise UserError(f"checkpoint {where} cannot be restored ({type(error).__name__}: "
                      f"{str(error).splitlines()[0][:200]}); it was written by a different model "
                      "or config: use a new --workdir or delete that step") from None
    return abstract_state.replace(**restored.state), restored.data

  def _state_tree(self, step: int) -> dict | None:
    """The saved state's tree of array metadata, by field name (None if unreadable)."""
    path = os.path.join(str(self._manager.directory), str(step), "state")
    metadata = ocp.StandardCheckpointer().metadata(path)
    return metadata.item_metadata.tree if metadata.item_metadata is not None else None

  def restore_config(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored.config

  def restore_params(self, step: int, field: str = "params"):
    """Only the policy params of `step` (or another state field, e.g. 'reference_params'),
    whole on this host's first device, whatever mesh wrote them: what export needs, without
    the reference or optimiser state in memory."""
    tree = self._state_tree(step)
    path = os.path.join(str(self._manager.directory), str(step), "state")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {field: jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree[field])}
    args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    return ocp.PyTreeCheckpointer().restore(path, args=args)[field]

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
