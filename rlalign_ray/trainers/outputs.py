"""The run's outputs seen from the driver: can every process that writes to
``trainer.output_dir`` reach it (``check_output_dir``), and the end of a run's logs
(``finish_logs``). Storage itself is ``rlalign_ray/storage.py``."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from rlalign_ray.errors import StorageError
from rlalign_ray.roles import DEEPSPEED_ROLES
from rlalign_ray.runtime.placement import get
from rlalign_ray.storage import (
    RunLogs,
    Storage,
    is_remote,
    probe_answered,
    remove_probes,
    write_probe,
)

log = logging.getLogger(__name__)

WRITERS = DEEPSPEED_ROLES  # the roles whose ranks write checkpoint files themselves


def check_output_dir(
    storage: Storage, output_dir: str, pools: dict[str, Any], timeout_s: float
) -> None:
    """Before any training, prove that every learner and critic rank (learner rank 0 also
    writes ``final/``) can use ``output_dir`` from its node: each reads the probe file the
    driver wrote there and writes its own, which the driver then reads. A local folder on a
    single-node cluster is not probed. Raises ``StorageError`` naming the nodes that fail
    and the fix."""
    import ray

    remote = is_remote(output_dir)
    driver = ray.get_runtime_context().get_node_id()
    nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    if not remote and set(nodes) <= {driver}:
        return
    token = uuid.uuid4().hex[:12]
    try:
        write_probe(storage, output_dir, token)
    except Exception as e:
        raise StorageError(
            f"trainer.output_dir: the driver cannot write to {output_dir!r} "
            f"({type(e).__name__}: {e}); {_fix(remote)}"
        ) from None
    try:
        bad = _unreached(storage, output_dir, token, pools, timeout_s)
    finally:
        remove_probes(storage, output_dir, token)
    if bad:
        raise StorageError(_message(output_dir, bad, (nodes.get(driver, "?"), driver)))


def _unreached(storage, output_dir, token, pools, timeout_s) -> dict[tuple[str, str], dict]:
    """(node IP, node id) -> {what went wrong: the ranks there it went wrong for}."""
    bad: dict[tuple[str, str], dict[str, list[str]]] = {}
    for role in WRITERS:
        if role not in pools:
            continue
        answers = get(
            pools[role].call("probe_storage", output_dir, token),
            f"{role}: checking trainer.output_dir",
            timeout_s,
        )
        for rank, (ip, node, who, problem) in enumerate(answers):
            if problem is None and not probe_answered(storage, output_dir, token, who):
                problem = "the driver does not see the file it wrote there"
            if problem is not None:
                bad.setdefault((ip, node), {}).setdefault(problem, []).append(f"{role} rank {rank}")
    return bad


def _message(output_dir: str, bad: dict, driver: tuple[str, str]) -> str:
    remote = is_remote(output_dir)
    lines = [
        f"  node {ip} (node id {node[:12]}): "
        + "; ".join(f"{', '.join(ranks)}: {problem}" for problem, ranks in problems.items())
        for (ip, node), problems in bad.items()
    ]
    if remote:
        head = (
            f"trainer.output_dir: {output_dir!r}: {len(bad)} node(s) running learner or critic "
            "ranks cannot write there:"
        )
    else:
        head = (
            f"trainer.output_dir: {output_dir!r} is a local folder, but {len(bad)} node(s) "
            "running learner or critic ranks do not share it with the driver (node "
            f"{driver[0]}, node id {driver[1][:12]}):"
        )
    why = (
        "Every learner and critic rank writes its checkpoint shards there from its own node "
        "(learner rank 0 also final/) and reads them back on resume."
    )
    return "\n".join([head, *lines, why, _fix(remote)])


def _fix(remote: bool) -> str:
    if remote:
        return (
            "Give every node credentials for it (the backend's environment variables, e.g. "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, in the job's runtime env: "
            "launch/submit.sh --env AWS_ACCESS_KEY_ID ...; or the nodes' cloud role), check "
            "that the bucket exists, and set trainer.storage_options (e.g. endpoint_url) if "
            "the store needs them."
        )
    return (
        "Mount one shared volume at that same path on every node (NFS, a ReadWriteMany "
        "PersistentVolumeClaim: see cluster/README.md), or write to a bucket: "
        "trainer.output_dir=s3://BUCKET/PATH (pip install 'rlalign-ray[s3]'; gs://... with "
        "'rlalign-ray[gcs]')."
    )


def finish_logs(logs: RunLogs, remove: bool) -> None:
    """At the end of ``fit``: upload the logs (a URI output_dir), or with ``remove`` (a new
    run that never trained a step) remove the local ``output_dir`` it made (in a URI it
    uploaded nothing yet). An upload that fails keeps the local copy and says where."""
    if remove:
        if not logs.remote:
            logs.storage.remove(logs.output_dir)
        logs.close()
        return
    try:
        logs.push()
    except Exception as e:
        log.error(
            "could not upload the run's logs to %s (%s: %s); they are in %s",
            logs.output_dir,
            type(e).__name__,
            e,
            logs.folder,
        )
        raise
    logs.close()
