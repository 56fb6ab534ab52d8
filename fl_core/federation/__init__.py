"""The federation: typed messages (:mod:`~fl_core.federation.messages`), the transport
interface (:mod:`~fl_core.federation.transport`), the coordinator's round loop
(:mod:`~fl_core.federation.coordinator`), the site client (:mod:`~fl_core.federation.site_client`),
the in-process simulation (:mod:`~fl_core.federation.simulation`) and the wiring that builds a
run from the configuration (:mod:`~fl_core.federation.wiring`)."""

from fl_core.federation.messages import (
    AuditInstruction,
    AuditReply,
    EvaluateInstruction,
    EvaluateReply,
    Failure,
    FitInstruction,
    FitReply,
    MessageError,
    decode_message,
    encode_message,
)

__all__ = ["AuditInstruction", "AuditReply", "EvaluateInstruction", "EvaluateReply", "Failure",
           "FitInstruction", "FitReply", "MessageError", "decode_message", "encode_message"]
