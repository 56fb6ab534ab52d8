"""Update codecs: every payload is a checked frame (:mod:`~fl_core.codec.framing`) around a
dense float32 body (:mod:`~fl_core.codec.dense`) or a top-k 8-bit body with Rice-coded index
gaps (:mod:`~fl_core.codec.topk`, :mod:`~fl_core.codec.rice`); :mod:`~fl_core.codec.payload`
decodes any of them by the codec id in the header, :mod:`~fl_core.codec.error_feedback` keeps
the client's exact residual, :mod:`~fl_core.codec.downlink` sends the model to the clients."""
