"""Measurements of the model on this device, one job per module.

`batches`: synthetic tokens. `blocks`: a built chunk's blocks timed alone (the benchmark's
per-layer figures and the planner's calibration). `syncs`: host waits for the device in
steps. `ceiling`: the matmul rate at the step's shapes. `profiler`: where a step's time goes.
`compile_cache`: compiled kernels carried between processes. The step's throughput is
`lws_megatron.benchmark`; the GPU measurement's rows are `rows` (what), `session` (one
process measuring them) and `results` (the table and the files that come back).
"""
