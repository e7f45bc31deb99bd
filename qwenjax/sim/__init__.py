"""A scheduling simulator: the real Scheduler and BlockManager driven by a fitted step-time model instead of a GPU.

  traces.py      request traces (arrivals, prompt / output lengths, priorities, clients), generators, JSONL files
  step_model.py  StepTimeModel: seconds per engine step from its shape, fitted by least squares to measured steps
  simulator.py   replays a trace through the scheduler on a simulated clock; TTFT / TPOT / throughput per policy

Plain Python and numpy; the engine's device code is never imported. `benchmarks/step_profile.py` fits a model on a
real engine, `benchmarks/sim_validate.py` checks simulated against measured on a trace the fit never saw.
"""

from qwenjax.sim.simulator import SimConfig, SimReport, compare_policies, simulate
from qwenjax.sim.step_model import StepSample, StepShape, StepTimeModel, step_shape
from qwenjax.sim.traces import (Fixed, Gamma, LengthsFromFile, LogNormal, OnOff, Poisson, Lengths, Trace,
                                TraceRequest, Uniform, make_trace)

__all__ = ["SimConfig", "SimReport", "compare_policies", "simulate", "StepSample", "StepShape", "StepTimeModel",
           "step_shape", "Fixed", "Gamma", "LengthsFromFile", "LogNormal", "OnOff", "Poisson", "Lengths", "Trace",
           "TraceRequest", "Uniform", "make_trace"]
