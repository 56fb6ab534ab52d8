"""The trained networks (:mod:`~fl_core.model.networks`: logistic regression, MLP, flat
parameter vectors) and the evaluation metrics (:mod:`~fl_core.model.metrics`: ROC/AUC,
accuracy, balanced accuracy, AUC from score histograms)."""
