"""The federation protocol: typed messages between the coordinator and the sites."""

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
