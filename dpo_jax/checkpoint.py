"""Checkpoints in WORKDIR/checkpoints: train state, data position and config, saved together.

Orbax writes asynchronously (training continues while the arrays are written) and atomically
(a step's folder appears only once complete), keeps the newest `keep` steps, and each host
writes only its own shards. Restoring takes the newest complete step, so re-running the same
command resumes where the last run stopped, on the same data.
"""
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
    """(state, data_state) of `step`, laid out like `abstract_state` (shapes and shardings)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    try:
      restored = self._manager.restore(step, args=args)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as error:
      where = os.path.join(str(self._manager.directory), str(step))
      raise UserError(f"checkpoint {where} cannot be restored ({type(error).__name__}: "
                      f"{str(error).splitlines()[0][:200]}); it was written by a different model "
                      "or config: use a new --workdir or delete that step") from None
    return restored.state, restored.data

  def restore_config(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored.config

  def restore_params(self, step: int):
    """Only the policy params of `step`, whole on this host's first device, whatever mesh
    wrote them: what export needs, without the reference or optimiser state in memory."""
    path = os.path.join(str(self._manager.directory), str(step), "state")
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {"params": jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree["params"])}
    args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    return ocp.PyTreeCheckpointer().restore(path, args=args)["params"]

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
