"""The federation protocol: typed messages between the coordinator and the sites."""

from fl_core.federation.messages import (
    EvaluateReply,
    Failure,
    FitInstruction,
    FitReply,
    MessageError,
    decode_message,
    encode_message,
)

__all__ = ["EvaluateReply", "Failure", "FitInstruction", "FitReply", "MessageError",
           "decode_message", "encode_message"]
