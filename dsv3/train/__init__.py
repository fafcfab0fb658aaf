"""Training: the loop, optimizer and schedules, losses, metrics and plots.

`schedules` (LR, batch size, bias-update speed, MTP weight), `metrics` (peak FLOPs, MFU, MaxVio,
the run's metric files) and `plots` (PNGs from those files) are model-agnostic and import no model code.
"""
