"""Operations (server/control/operations.py) as the public API's messages."""
from __future__ import annotations

import time
from typing import Callable

from server.api import elasticmoe_pb2 as pb
from server.control.operations import Operation
from server.control.topology import Topology

PHASES = {
    "planned": pb.OPERATION_PHASE_PLANNED, "preparing": pb.OPERATION_PHASE_PREPARING,
    "committing": pb.OPERATION_PHASE_COMMITTING, "releasing": pb.OPERATION_PHASE_RELEASING,
    "done": pb.OPERATION_PHASE_DONE, "aborted": pb.OPERATION_PHASE_ABORTED,
}


def scale_response(op: Operation, topology: Callable[[Topology | None], pb.Topology]) -> pb.ScaleResponse:
    """The figures of a done operation; only the id (and the topology serving now) before that."""
    r = op.report
    if r is None:
        return pb.ScaleResponse(operation_id=op.operation_id, topology=topology(None))
    committed = next((m.end for m in op.phases if m.phase == "committing"), None)
    return pb.ScaleResponse(
        operation_id=op.operation_id, topology=topology(r.topology),
        # request received -> new version committed, as the field always meant
        duration_seconds=(committed if committed is not None else op.phases[-1].start) - op.created,
        bytes_copied=r.bytes_copied, bytes_remapped=r.bytes_remapped, bytes_loaded=r.bytes_loaded,
        phase_seconds=r.parts, experts_moved=sum(r.moves.values()))


def operation_to_proto(op: Operation, topology: Callable[[Topology | None], pb.Topology],
                       now: float | None = None) -> pb.Operation:
    now = time.time() if now is None else now
    msg = pb.Operation(operation_id=op.operation_id, kind=op.kind, target_workers=op.target,
                       phase=PHASES.get(op.phase, pb.OPERATION_PHASE_UNSPECIFIED), error=op.error)
    for m in op.phases:
        msg.phases.append(pb.PhaseTiming(phase=PHASES[m.phase], start_unix_seconds=m.start,
                                         seconds=(m.end if m.end is not None else now) - m.start))
    if op.report is not None:
        msg.result.CopyFrom(scale_response(op, topology))
    return msg
