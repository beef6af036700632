"""Measurement: spike statistics and synaptic operations (``SparsityMonitor``), energy tables, held-out evaluation
and the sparsity plot. Stands on ``spikelm.model``; used by training and by the commands."""
