"""fedpriv's entry points (the CLI, the Prefect flows, the site worker's engine).

Every process fedpriv starts imports this package first, so process-wide settings live here:
Opacus hooks the model's layers, and with inputs that need no gradient torch warns at every
DP-SGD step ("Full backward hook is firing ..."); the training's own ``catch_warnings`` cannot
silence it when sites train on threads (the filter list is process-wide, each thread's
context restores it). The warning says nothing a user can act on.
"""

import warnings

warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
