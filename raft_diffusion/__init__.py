"""raft-diffusion: align generative models with rewards by RAFT (Reward rAnked FineTuning)."""

__version__ = "0.1.0"
